"""Strata's tokenizer.json tokenizer against the `tokenizers` library.

Tokenizers of each supported kind are trained here with the library's own trainers on a small
generated corpus (GPT-2 byte-level BPE; Llama-3 style: a Split regex, byte-level, a BOS template
and added special tokens; Llama-2 style: byte fallback with Prepend/Replace normalizers or a
Metaspace pre-tokenizer; ignore_merges; merges in the legacy "a b" form; every Split behaviour).
Each encodes a multilingual set of strings with and without special tokens through
`strata tokenize`; the ids must be equal, and decoding (of those ids and of random id
sequences) must give the text `Tokenizer.decode(ids, skip_special_tokens=False)` gives.
Invalid UTF-8 reaches Strata as bytes and the library as the text Python decodes with
errors="replace": the ids must agree. Unsupported components are refused with exact messages.
"""

import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common  # noqa: E402

hf_common.setup()
(tokenizers,) = hf_common.require_libraries("tokenizers")
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, processors, trainers)

checks = hf_common.Checks()
rng = random.Random(1234)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

SAMPLES = [
    "Hello world", " Hello  world ", "Hello\tworld\t\ttabs", "line one\nline two\r\nline three\r\n",
    "   leading and trailing spaces   ", "\n\n\nnewlines\n\n", "", " ", "  ", "\t", "\r\n",
    "don't won't I'm you're they've he'll she'd IT'S THEY'RE", "12345678901234567890 3.14159 1,000,000",
    "Numbers: 0 01 012 0123 01234", "emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "中文测试：你好，世界！这是一个句子。", "日本語のテキスト、カタカナとひらがな。", "한국어 문장입니다.",
    "combining: e\u0301 a\u0300 n\u0303 o\u0308\u0304 Z\u0351\u0352\u0357",
    "Arabic: مرحبا بالعالم، هذا نص عربي.", "Devanagari: नमस्ते दुनिया, यह हिंदी है।",
    "Ελληνικά και Кириллица смешанные", "mixed   whitespace \u00a0nbsp\u2003em\u3000ideographic",
    "punctuation!!! ??? ... --- *** ((())) [[]] {{}}", "code: def f(x): return x**2 + 1  # comment",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
    "text<|endoftext|>more text<|endoftext|>", "<s>a sentence</s><s> another</s>",
    "before <mask> after", "spaces   <mask>   around", "a<tool>b <tool> c",
    "<|begin_of_text|>already there", "URL https://example.com/path?q=1&r=2#frag",
    "email someone@example.org", "tabs\t\t\tand\t spaces \t mixed", "x" * 300, "ab" * 200,
    " " * 50 + "x", "\u2581 a literal metaspace \u2581\u2581 char", "Ġ Ċ byte-level lookalikes",
    "Zero\u200bwidth\u200cjoiners\u200d", "fullwidth ＡＢＣ１２３", "math ∑∫√∞≠≤ ≥ ±", "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕",
    "Straße façade naïve coöperate résumé", "Thai ภาษาไทย Hebrew עברית", "\x00\x01\x1f control chars",
]


def corpus_lines():
    lines = []
    try:
        with open(hf_common.FORTUNES, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n") for line in f if line.strip() and line.strip() != "%"][:3000]
    except OSError:
        pass
    multilingual = [s for s in SAMPLES if s]
    for i in range(1500):
        lines.append(" ".join(rng.choice(multilingual) for _ in range(3)))
    return lines


def random_text(n):
    """Random code points from scripts, marks, symbols, whitespace and the specials' pieces."""
    ranges = [(0x20, 0x7e), (0x09, 0x0d), (0xa0, 0x24f), (0x300, 0x36f), (0x370, 0x3ff), (0x400, 0x4ff),
              (0x590, 0x6ff), (0x900, 0x97f), (0x0e00, 0x0e7f), (0x2000, 0x206f), (0x3000, 0x30ff),
              (0x4e00, 0x4fff), (0xac00, 0xacff), (0xff00, 0xffef), (0x1f300, 0x1f6ff), (0x1d400, 0x1d4ff)]
    pieces = ["<|im_start|>", "<|endoftext|>", "<mask>", "<tool>", "<s>", "\u2581", "\r\n", "   ", "'s", "'LL"]
    out = []
    for _ in range(n):
        if rng.random() < 0.05:
            out.append(rng.choice(pieces))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


LINES = corpus_lines()
TEXTS = (SAMPLES + LINES[:: max(1, len(LINES) // 150)] + [random_text(rng.randrange(1, 80)) for _ in range(150)]
         + [" " * 5000 + "x", "y" * 5000, "\n" * 3000, "7" * 1000])


def train_bpe(pre_tokenizer, special, vocab=1200, byte_level=True, limit_alphabet=None,
              normalizer=None, **model_args):
    tok = Tokenizer(models.BPE(**model_args))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    kwargs = dict(vocab_size=vocab, special_tokens=special, show_progress=False)
    if byte_level:
        kwargs["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    if limit_alphabet:
        kwargs["limit_alphabet"] = limit_alphabet
    tok.train_from_iterator(LINES, trainers.BpeTrainer(**kwargs))
    return tok


def with_byte_tokens(tok):
    """A Llama-2 style vocabulary: <0x00>..<0xFF> appended to the model's vocabulary."""
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    next_id = max(max(vocab.values()), max(t["id"] for t in j["added_tokens"])) + 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = next_id
        next_id += 1
    return Tokenizer.from_str(json.dumps(j))


def build():
    out = {}
    gpt2 = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    gpt2.decoder = decoders.ByteLevel()
    gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
    out["gpt2"] = gpt2

    prefix = Tokenizer.from_str(gpt2.to_str())
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    out["gpt2_prefix_space"] = prefix

    j = json.loads(gpt2.to_str())
    j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    out["gpt2_legacy_merges"] = Tokenizer.from_str(json.dumps(j))
    checks.true("the legacy merges are strings and load in tokenizers",
                isinstance(j["model"]["merges"][0], str))

    llama3_pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    for name, ignore in (("llama3", False), ("llama3_ignore_merges", True)):
        tok = train_bpe(llama3_pre, specials, vocab=1500, ignore_merges=ignore)
        tok.decoder = decoders.ByteLevel()
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        tok.add_tokens(["<tool>"])  # not special, normalized
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=True)])
        out[name] = tok

    # Llama 2 as transformers converts it: Prepend/Replace normalizers, no pre-tokenizer.
    llama2 = train_bpe(None, ["<unk>", "<s>", "</s>"], vocab=900, byte_level=False, limit_alphabet=120,
                       normalizer=normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                        normalizers.Replace(" ", "\u2581")]),
                       unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    llama2 = with_byte_tokens(llama2)
    llama2.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    llama2.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", llama2.token_to_id("<s>"))])
    out["llama2_normalizers"] = llama2

    # Metaspace pre-tokenizer (prepend_scheme first) with digits split, EOS appended.
    meta = train_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True)]),
        ["<unk>", "<s>", "</s>"], vocab=900, byte_level=False, limit_alphabet=120,
        unk_token="<unk>", byte_fallback=True)
    meta = with_byte_tokens(meta)
    meta.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Metaspace(replacement="\u2581", prepend_scheme="first")])
    meta.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", meta.token_to_id("<s>")),
                                              ("</s>", meta.token_to_id("</s>"))])
    out["metaspace_digits"] = meta

    always = Tokenizer.from_str(meta.to_str())
    always.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                    split=False)
    always.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Metaspace(replacement="\u2581", prepend_scheme="always")])
    out["metaspace_always"] = always

    # Every Split behaviour, plain and inverted, and contiguous digits, on the GPT-2 model.
    for behavior in ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous"):
        for invert in (False, True):
            tok = Tokenizer.from_str(gpt2.to_str())
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"\s+|\p{P}"), behavior=behavior, invert=invert),
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            out[f"split_{behavior}{'_inverted' if invert else ''}"] = tok
    # Qwen2 style: NFC, a Split regex (digits one by one), byte-level; and the other forms.
    qwen_pattern = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        tok = Tokenizer.from_str(out["llama3"].to_str())
        tok.normalizer = getattr(normalizers, form)()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(qwen_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        out[f"qwen2_{form.lower()}"] = tok
    string_split = Tokenizer.from_str(gpt2.to_str())
    string_split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    out["split_string_pattern"] = string_split
    return out


def run_strata(args, stdin_bytes):
    p = subprocess.run([hf_common.STRATA, "tokenize"] + args, input=stdin_bytes, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


def strata_lines(path, items, *flags):
    payload = "".join(json.dumps(x) + "\n" for x in items).encode()
    rc, out, err = run_strata(["--tokenizer", path, "--lines", *flags], payload)
    if rc != 0:
        raise SystemExit(f"FAIL: strata tokenize {path} {flags}: {err}")
    return [json.loads(line) for line in out.decode().split("\n") if line]  # not at U+2028


def first_difference(got, expected):
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return i
    return min(len(got), len(expected))


def compare_tokenizer(name, tok, whole_file):
    """Encodes TEXTS without and with special tokens and decodes id lists in one `strata
    tokenize --lines` run; with `whole_file`, also the file forms (a long text, invalid UTF-8,
    --decode)."""
    path = os.path.abspath(f"{name}/tokenizer.json")
    os.makedirs(name, exist_ok=True)
    tok.save(path)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    # Decoding: the ids of every text, and random id sequences (invalid UTF-8 included).
    id_lists = [tok.encode(t).ids for t in TEXTS] + [tok.encode(t, add_special_tokens=False).ids for t in TEXTS[:20]]
    id_lists += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 12))] for _ in range(200)]
    requests = ([{"text": t, "add_special_tokens": False} for t in TEXTS]
                + [{"text": t, "add_special_tokens": True} for t in TEXTS] + id_lists)
    answers = strata_lines(path, requests)
    for k, special in enumerate((False, True)):
        expected = [tok.encode(t, add_special_tokens=special).ids for t in TEXTS]
        got = answers[k * len(TEXTS):(k + 1) * len(TEXTS)]
        bad = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
        ids = sum(len(e) for e in expected)
        detail = f"{len(TEXTS)} strings, {ids} ids"
        if bad or len(got) != len(expected):
            i = bad[0] if bad else 0
            j = first_difference(got[i], expected[i])
            detail += (f"; {len(bad)} differ, first {TEXTS[i][:60]!r} at id {j}: "
                       f"strata {got[i][j:j + 6]} vs tokenizers {expected[i][j:j + 6]}")
        checks.true(f"{name}: encode (add_special_tokens={special})", not bad and len(got) == len(expected),
                    detail)
    expected = [tok.decode(ids, skip_special_tokens=False) for ids in id_lists]
    got = answers[2 * len(TEXTS):]
    bad = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    detail = f"{len(id_lists)} id lists, {sum(len(e) for e in expected)} characters"
    if bad:
        detail += f"; {len(bad)} differ, first {id_lists[bad[0]]}: {got[bad[0]]!r} vs {expected[bad[0]]!r}"
    checks.true(f"{name}: decode", not bad and len(got) == len(expected), detail)
    if not whole_file:
        return
    # The whole corpus as one text through the file form (ids as one JSON array).
    text = "\n".join(LINES[:300] + LINES[-100:]) + "\n"
    with open(f"{name}/corpus.txt", "w", encoding="utf-8") as f:
        f.write(text)
    out = hf_common.strata_stdout("tokenize", "--tokenizer", name, "--input", f"{name}/corpus.txt",
                                  "--add-special-tokens")
    expected = tok.encode(text, add_special_tokens=True).ids
    checks.equal(f"{name}: a {len(text.encode())}-byte text in one piece", json.loads(out), expected,
                 show=f"{len(expected)} ids")
    # Invalid UTF-8: bytes for Strata, their errors="replace" decoding for tokenizers.
    raw = b"ok \xff\xfe bytes \xe2\x82 cut \xc3( \xed\xa0\x80 surrogate \xf0\x9f\x98 end\xf0"
    rc, out, err = run_strata(["--tokenizer", path], raw)
    expected = tok.encode(raw.decode("utf-8", errors="replace"), add_special_tokens=False).ids
    checks.equal(f"{name}: invalid UTF-8 encodes as its errors='replace' text", rc == 0 and json.loads(out),
                 expected)
    # The decoded text of the file form is written byte for byte.
    ids = tok.encode(TEXTS[16] + TEXTS[14]).ids
    rc, out, err = run_strata(["--tokenizer", path, "--decode"], json.dumps(ids).encode())
    checks.equal(f"{name}: --decode of a JSON array", out.decode("utf-8"), tok.decode(ids, skip_special_tokens=False))


def refusal(name, mutate, expected):
    j = json.loads(BASE_JSON)
    mutate(j)
    os.makedirs("refused", exist_ok=True)
    path = os.path.abspath(f"refused/{name}.json")
    with open(path, "w") as f:
        json.dump(j, f)
    rc, out, err = run_strata(["--tokenizer", path], b"text")
    message = err.strip().splitlines()[0] if err.strip() else ""
    checks.equal(f"refused: {name}", (rc, message), (1, f"error: {path}: {expected}"))


tokenizers_built = build()
for tok_name, tok_obj in tokenizers_built.items():
    compare_tokenizer(tok_name, tok_obj, whole_file=tok_name in (
        "gpt2", "llama3", "llama2_normalizers", "metaspace_digits", "qwen2_nfc"))

BASE_JSON = tokenizers_built["gpt2"].to_str()
wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
refusal("wordpiece", lambda j: j.update(json.loads(wordpiece.to_str())),
        "model.type 'WordPiece' is not supported (supported: BPE)")
refusal("bert_pre_tokenizer",
        lambda j: j.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
            j["pre_tokenizer"], {"type": "BertPreTokenizer"}]}),
        "pre_tokenizer.pretokenizers[1].type 'BertPreTokenizer' is not supported "
        "(supported: ByteLevel, Split, Metaspace, Sequence, Digits)")
refusal("lowercase", lambda j: j.update(normalizer={"type": "Lowercase"}),
        "normalizer.type 'Lowercase' is not supported "
        "(supported: NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)")
refusal("dropout", lambda j: j["model"].update(dropout=0.1),
        "model.dropout 0.1 is not supported (only null)")
refusal("wordpiece_decoder", lambda j: j.update(decoder={"type": "WordPiece", "prefix": "##", "cleanup": True}),
        "decoder.type 'WordPiece' is not supported "
        "(supported: ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence)")
refusal("roberta_processing", lambda j: j.update(post_processor={"type": "RobertaProcessing"}),
        "post_processor.type 'RobertaProcessing' is not supported "
        "(supported: TemplateProcessing, ByteLevel, Sequence)")
refusal("single_word", lambda j: j["added_tokens"][0].update(single_word=True),
        "added_tokens[0].single_word true is not supported (only false)")
refusal("truncation", lambda j: j.update(truncation={"max_length": 8, "strategy": "LongestFirst",
                                                     "stride": 0, "direction": "Right"}),
        'truncation {"direction":"Right","max_length":8,"strategy":"LongestFirst","stride":0} '
        "is not supported (only null: Strata encodes whole texts)")

# End to end: prepare-data with a model directory holding tokenizer.json (BOS from its
# tokenizer_config.json), a short training whose samples decode through it, and the HF export
# carrying the tokenizer files as they are, which transformers' AutoTokenizer then loads.
llama3 = tokenizers_built["llama3"]
os.makedirs("llama3_model", exist_ok=True)
llama3.save("llama3_model/tokenizer.json")
with open("llama3_model/tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False,
                             "normalized": False, "rstrip": False, "single_word": False, "special": True},
               "model_max_length": 64}, f)
with open("docs.txt", "w", encoding="utf-8") as f:
    f.write("\n%\n".join(LINES[:200]) + "\n")
hf_common.strata("prepare-data", "--input", "docs.txt", "--out", "data", "--tokenizer", "llama3_model",
                 "--separator", "%", "--val-fraction", "0.1")
meta = json.load(open("data/meta.json"))
checks.equal("prepare-data records the copied tokenizer.json", meta["tokenizer"],
             os.path.abspath("data/tokenizer.json") if os.path.isabs(meta["tokenizer"]) else "data/tokenizer.json")
train_tokens = hf_common.read_tokens("data/train_000000.bin").tolist()
bos = llama3.token_to_id("<|begin_of_text|>")
documents = [LINES[i] for i in range(200)]
expected_docs = sum(1 for t in train_tokens if t == bos)
checks.true("documents in the shards start with BOS", train_tokens[0] == bos and expected_docs > 150,
            f"{expected_docs} BOS ids")
first = train_tokens[1:train_tokens.index(bos, 1)]
checks.true("a document's ids are tokenizers' ids of its text",
            any(first == llama3.encode(d + sep, add_special_tokens=False).ids
                for d in documents for sep in ("", "\n")))
vocab = max(1536, llama3.get_vocab_size(with_added_tokens=True))
job = f"""job: {{name: hf_tokenizer, seed: 3}}
model: {{vocab_size: {vocab}, dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}}
data: {{train: "data/train_*.bin", val: "data/val_000000.bin", tokenizer: data/tokenizer.json, seq_len: 32}}
training: {{steps: 4, global_batch_size: 2, micro_batch_size: 2, eval_interval: 4, log_interval: 2}}
parallel: {{threads_per_rank: 1}}
checkpoint: {{interval: 4}}
"""
hf_common.train(job, "hf_tokenizer", "job.run_dir=run")
samples = open("run/samples.txt", encoding="utf-8").read()
checks.true("training samples are decoded text", "=== step 4 ===" in samples, samples[:80].replace("\n", " "))
export = "run/checkpoints/hf-latest"
for name in ("tokenizer.json", "tokenizer_config.json"):
    src = open(f"llama3_model/{name}", "rb").read()
    dst = open(f"{export}/{name}", "rb").read() if os.path.exists(f"{export}/{name}") else None
    checks.true(f"the export carries {name} byte for byte", src == dst)
checks.true("the export has no SentencePiece files", not os.path.exists(f"{export}/tokenizer.model"))
(transformers,) = hf_common.require_libraries("transformers")
auto = transformers.AutoTokenizer.from_pretrained(export)
out = hf_common.strata_stdout("tokenize", "--tokenizer", export, "--add-special-tokens", "--input", "docs.txt")
checks.equal("AutoTokenizer on the export encodes as strata tokenize",
             json.loads(out), auto(open("docs.txt", encoding="utf-8").read())["input_ids"])
gen = hf_common.strata_stdout("generate", "--from", export, "--prompt", "Hello", "--max-new-tokens", "4",
                              "--temperature", "0")
checks.true("generate runs on the export with its tokenizer.json", gen.startswith("Hello"), repr(gen[:60]))
checks.done()
