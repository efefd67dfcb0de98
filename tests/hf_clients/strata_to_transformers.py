#!/usr/bin/env python3
"""Strata -> transformers: the HF exports of Strata trainings (several shards; fp32 and bf16;
tied and untied) load with AutoModelForCausalLM.from_pretrained with no missing, unexpected or
mismatched key, in the dtype config.json names; transformers' loss equals `strata eval` of the
export (<= 1e-5 relative, fp32); greedy generation of 20 tokens gives the ids `strata generate
--temperature 0` gives; AutoTokenizer on the export encodes texts (edge cases and the whole
training corpus) to the ids Strata's tokenizer gives and decodes them back."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402

hc.setup()
torch, transformers, sentencepiece = hc.require_libraries("torch", "transformers", "sentencepiece")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(1)
checks = hc.Checks()
data = hc.prepare_data()
val = f"{data}/val_000000.bin"
tokens = hc.read_tokens(val)
T = 64

job = f"""job: {{name: export, seed: 11}}
model: {{vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, rope_theta: 50000.0, max_seq_len: {T}}}
data: {{train: "{data}/train_*.bin", val: "{val}", tokenizer: {data}/tokenizer.model, seq_len: {T}}}
training: {{steps: 30, global_batch_size: 4, micro_batch_size: 4, eval_interval: 0, log_interval: 10}}
optimizer: {{lr: 1.0e-2}}
parallel: {{threads_per_rank: 1}}
checkpoint: {{interval: 30, hf_max_shard_size: 20KB}}
"""
exports = {}
for tied in (False, True):
    for dtype in ("float32", "bfloat16"):
        run = f"{'tied' if tied else 'untied'}_{dtype}"
        hc.train(job, "export", f"job.run_dir={run}", f"model.tie_embeddings={'true' if tied else 'false'}",
                 f"checkpoint.export_dtype={dtype}")
        exports[run] = (f"{run}/checkpoints/hf-latest", dtype, tied)

# A word-level SentencePiece model over the same 400 ids: its decoding is injective (every
# piece is one space-separated word), so the text `strata generate` prints gives back its ids.
# Its BOS and EOS are the last two ids, so that the model's own BOS and EOS (1 and 2, which the
# model predicts after a newline) are words too instead of decoding to nothing.
BOS, EOS = 398, 399
words = [f"w{i}" for i in range(397)]
with open("words.txt", "w") as f:
    for i, w in enumerate(words):
        f.write(" ".join([w] * (1 + i % 7)) + "\n")
sentencepiece.SentencePieceTrainer.train(input="words.txt", model_prefix="words", model_type="word", vocab_size=400,
                                         unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1, minloglevel=2)
word_sp = sentencepiece.SentencePieceProcessor(model_file="words.model")
assert (word_sp.bos_id(), word_sp.eos_id()) == (BOS, EOS)


def word_ids(text):
    return [0 if w == "\u2047" else word_sp.piece_to_id("\u2581" + w) for w in text.split()]


prompt_words = "w5 w17 w3 w101"
prompt_text = "The meaning of life is"
for run, (d, dtype, tied) in exports.items():
    n = len(hc.safetensors_files(d))
    checks.true(f"{run}: {n} shards", n > 2)
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    model.eval()
    checks.equal(f"{run}: from_pretrained loading info",
                 {k: list(v) for k, v in info.items()},
                 {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []})
    checks.equal(f"{run}: tie_word_embeddings", model.config.tie_word_embeddings, tied)
    if tied:
        checks.true(f"{run}: lm_head is the embedding", model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    auto = AutoModelForCausalLM.from_pretrained(d)
    checks.equal(f"{run}: dtype of from_pretrained without dtype", str(auto.dtype), f"torch.{dtype}")
    ours = hc.strata_eval(d, val, T)
    theirs = hc.window_loss(model, tokens, T)
    checks.close(f"{run}: transformers loss == strata eval", theirs, ours)

    # Greedy generation, ids through the word tokenizer.
    out = hc.strata_stdout("generate", "--from", d, "--tokenizer", "words.model", "--prompt", prompt_words,
                           "--temperature", 0, "--max-new-tokens", 20).strip()
    prompt = [BOS] + word_sp.encode(prompt_words)
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=EOS,
                                   pad_token_id=EOS)[0].tolist()
    generated = generated[1:]
    if generated[-1] == EOS:  # both stop after it, and it decodes to nothing
        generated = generated[:-1]
    checks.equal(f"{run}: greedy ids, transformers generate == strata generate --temperature 0",
                 generated, word_ids(out), show=f"new tokens {generated[len(prompt) - 1:]}")

    # Greedy generation with the export's own tokenizer: the text Strata prints is the
    # decoding of transformers' ids.
    tok = AutoTokenizer.from_pretrained(d)
    out = hc.strata_stdout("generate", "--from", d, "--prompt", prompt_text, "--temperature", 0,
                           "--max-new-tokens", 20)[:-1]  # the text, then a newline
    ids = tok(prompt_text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=2)[0]
    checks.equal(f"{run}: greedy text, AutoTokenizer.decode(transformers ids) == strata generate",
                 tok.decode(generated, skip_special_tokens=True), out)

# The tokenizer: AutoTokenizer on an export against Strata's tokenizer (prepare-data with the
# export's tokenizer.model: every document is BOS + its ids). Edge cases, one file each, then
# every document of the fortunes corpus.
d = exports["untied_float32"][0]
for run, (other, _, _) in exports.items():
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        checks.true(f"{run}: {f} is the same file as in {d}", open(f"{other}/{f}", "rb").read() == open(f"{d}/{f}", "rb").read())
samples = ["Hello world", "The quick brown fox jumps over the lazy dog.", "  two  spaces\nnew line\n\n",
           " a leading space", "trailing space ", "\ttab\tseparated", "digits 1234567890", "ünïcödé, 日本語, emoji 🤖",
           "<s> and </s> and <unk> as text", "\u2581 the space symbol", "x"]
os.makedirs("samples")
for i, text in enumerate(samples):
    with open(f"samples/{i:02d}.txt", "w") as f:
        f.write(text)
hc.strata("prepare-data", "--input", *[f"samples/{i:02d}.txt" for i in range(len(samples))], hc.FORTUNES,
          "--separator", "%", "--tokenizer", f"{d}/tokenizer.model", "--val-fraction", 0, "--out", "tokenized")
stream = hc.read_tokens("tokenized/train_000000.bin").tolist()
strata_docs, current = [], None
for t in stream:
    if t == 1:
        current = [1]
        strata_docs.append(current)
    else:
        current.append(t)


def documents(text):  # prepare-data's split at lines equal to the separator
    out, doc = [], []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        line += "\n" if i + 1 < len(lines) else ""
        if line.rstrip("\n").rstrip("\r") == "%":
            out.append("".join(doc))
            doc = []
        else:
            doc.append(line)
    out.append("".join(doc))
    return [x for x in out if x.strip(" \t\r\n")]


corpus = documents(open(hc.FORTUNES, encoding="utf-8", newline="").read())
texts = samples + corpus
checks.equal("documents: prepare-data's count", len(strata_docs), len(texts))
tok = AutoTokenizer.from_pretrained(d)
print(f"AutoTokenizer on the export: {type(tok).__name__}")
bad_encode = [i for i, text in enumerate(texts) if tok(text)["input_ids"] != strata_docs[i]]
# Decoding as Strata decodes (SentencePiece, the library Strata links): the text itself, except
# where SentencePiece cannot give it back either (a literal U+2581 decodes as a space).
spm = sentencepiece.SentencePieceProcessor(model_file=f"{d}/tokenizer.model")
bad_decode = [i for i, text in enumerate(texts) if tok.decode(strata_docs[i], skip_special_tokens=True) != spm.decode(strata_docs[i])]
not_round_trip = [i for i, text in enumerate(texts) if spm.decode(strata_docs[i]) != text]
checks.equal("texts SentencePiece does not decode back to themselves", [texts[i] for i in not_round_trip],
             ["\u2581 the space symbol"])
for i in (bad_encode + bad_decode)[:5]:
    print(f"      text {texts[i][:60]!r}\n      strata {strata_docs[i][:16]}\n      hf     {tok(texts[i])['input_ids'][:16]}")
n_tokens = sum(len(x) for x in strata_docs)
checks.equal(f"AutoTokenizer encodes {len(samples)} edge cases and {len(corpus)} documents ({n_tokens} tokens) to "
             f"Strata's ids (texts that differ)", bad_encode, [])
checks.equal("AutoTokenizer decodes Strata's ids to the text SentencePiece decodes (texts that differ)", bad_decode, [])
checks.done()
