#!/usr/bin/env bash
# End-to-end instruction tuning: JSONL records (chat, prompt/completion, text) prepared with a
# model's own tokenizer and a chat template into packed windows with loss masks; the masks mark
# exactly the answers; LoRA on the masked loss gives the same curve on 1 and 2 ranks and with
# gradient accumulation; the masked validation loss falls; the PEFT adapter export evaluates;
# and every bad input is refused with its message.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null
cat > base.yaml <<YAML
job: {name: base, run_dir: base, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 128}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 64}
training: {steps: 8, global_batch_size: 8, micro_batch_size: 8, eval_interval: 0, log_interval: 4}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 8}
YAML
"$STRATA_BIN" train --config base.yaml >base.log 2>&1 || { cat base.log; fail "base run failed"; }
base_dir=$(readlink -f base/checkpoints/hf-latest)

python3 "$STRATA_SOURCE_DIR/scripts/make_chat_data.py" chat.jsonl --records 400 >/dev/null
template="$STRATA_SOURCE_DIR/configs/sft_chat_template.jinja"
"$STRATA_BIN" prepare-data --format jsonl --input chat.jsonl --out sft --tokenizer "$base_dir" \
  --chat-template "$template" --seq-len 128 --val-fraction 0.1 >prep.log 2>&1 || { cat prep.log; fail "prepare-data jsonl failed"; }
cat prep.log
grep -q "^prepare-data: 400 records (jsonl) -> packed windows with loss masks" prep.log || fail "no jsonl report"
grep -q "chat template $template" prep.log || fail "the report does not name the chat template"
[ -f sft/train_000000.bin ] && [ -f sft/train_000000.mask ] && [ -f sft/val_000000.mask ] || fail "missing shards or masks"

# The masks mark the answers: in every window, the target tokens decode to the answers of its
# records (and the EOS after each), nothing else; the prompts and questions are never targets.
python3 - sft "$STRATA_BIN" "$base_dir" <<'PY'
import json, struct, subprocess, sys
d, strata, tokenizer = sys.argv[1:]
def read(path):
    raw = open(path, "rb").read()
    header = struct.unpack("<256i", raw[:1024])
    width = {20240520: 2, 20240801: 4, 20261202: 1}[header[0]]
    fmt = {1: "B", 2: "H", 4: "I"}[width]
    return header, list(struct.unpack("<%d%s" % (header[2], fmt), raw[1024:]))
meta = json.load(open(d + "/meta.json"))
assert meta["format"] == "jsonl" and meta["seq_len"] == 128, meta
(th, tokens), (mh, flags) = read(d + "/train_000000.bin"), read(d + "/train_000000.mask")
assert th[3] == mh[3] == 129 and len(tokens) == len(flags) and len(tokens) % 129 == 0, (th[:4], mh[:4])
assert mh[1] == 2 and all(f < 4 for f in flags), (mh[:4], set(flags))
# Bit 0: a target; bit 1: a document starts (every window's first token, each record's BOS).
mask = [f & 1 for f in flags]
starts = [i for i, f in enumerate(flags) if f & 2]
assert all(w * 129 in starts for w in range(len(tokens) // 129)), starts[:10]
assert all(flags[i] & 2 for i, t in enumerate(tokens) if t == 1), "each record (BOS, id 1) starts a document"
assert not any(mask[i] for i in starts), "a document's first token is never a target"
packing = meta["packing"]["train"]
assert packing["records"] + packing["dropped"] + meta["packing"]["val"]["records"] + meta["packing"]["val"]["dropped"] \
    + meta["records"]["without_targets"] == 400, meta
assert packing["target_tokens"] == sum(mask) and 0 < sum(mask) < len(mask), (packing, sum(mask))
target_ids = [t for t, m in zip(tokens[:129 * 4], mask[:129 * 4]) if m]
text = subprocess.run([strata, "tokenize", "--tokenizer", tokenizer, "--decode"], input=json.dumps(target_ids),
                      capture_output=True, text=True, check=True).stdout
context = subprocess.run([strata, "tokenize", "--tokenizer", tokenizer, "--decode"],
                         input=json.dumps([t for t, m in zip(tokens[:129 * 4], mask[:129 * 4]) if not m]),
                         capture_output=True, text=True, check=True).stdout
print("targets of the first 4 windows:", repr(text[:200]))
assert "Question" not in text and "What is" not in text and "\n" not in text, text
# Every answer ends with its EOS, and nothing follows it as a target.
assert text.rstrip().endswith("</s>") and ".</s>" in text, text
assert " is " in text and ("plus" in text or "minus" in text), text
assert "What is" in context and "### Question:" in context, context
PY

# LoRA on the masked loss: 1 rank, 2 ranks, and 1 rank with 4 micro-batches per step.
cat > sft.yaml <<YAML
job: {name: sft, run_dir: sft1, seed: 3}
data: {train: "sft/train_*.bin", val: "sft/val_*.bin", tokenizer: $base_dir/tokenizer.model, seq_len: 128}
training: {steps: 24, global_batch_size: 8, micro_batch_size: 4, eval_interval: 12, eval_batches: 1, log_interval: 1}
optimizer: {lr: 1.0e-2}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 24, last_save_model_only: false, resume_path: $base_dir}
converters: [{type: lora, rank: 4, alpha: 8, target_modules: [wq, wk, wv, wo, w1, w2, w3], export: both}]
YAML
TRAIN_CONFIG=sft.yaml  # for train (lib/common.sh)
train 1 sft1
train 2 sft2
train 1 sft1_accumulate --set training.micro_batch_size=2
python3 - <<'PY'
import json
def curve(d):
    rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]
ref = curve("sft1")
assert len(ref[0]) == 24 and len(ref[1]) == 2, ref
for name in ("sft2", "sft1_accumulate"):
    got = curve(name)
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert abs(a - b) <= 1e-5 * abs(a), (name, a, b)
    print(f"{name}: the masked loss curve matches 1 rank")
first = json.loads(open("sft1/metrics.jsonl").readline())["loss"]
print(f"masked train loss {first:.4f} -> {ref[0][-1]:.4f}; val_loss {ref[1]}")
assert ref[0][-1] < first, (first, ref[0][-1])
PY
grep -q "eval step 24 | val_loss" sft1.log || fail "no validation at the last step"

# Per-document attention (data.document_masking): the same on 1 and 2 ranks, and not what
# attention across the packed records gives.
for np in 1 2; do
  train $np docs$np --set training.steps=6 --set training.eval_interval=6 \
    --set data.document_masking=true --set checkpoint.enable=false
done
python3 - <<'PY'
import json
def curve(d):
    rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r] + [r["val_loss"] for r in rows if "val_loss" in r]
one, two, across = curve("docs1"), curve("docs2"), curve("sft1")
assert len(one) == 7 and len(two) == 7, (one, two)
for a, b in zip(one, two):
    assert abs(a - b) <= 1e-5 * abs(a), ("2 ranks", a, b)
print(f"document masking: 2 ranks equal 1 ({len(one)} losses); step-1 loss {one[0]:.6f}, "
      f"{across[0]:.6f} with attention across records")
PY
# Packed with document masking = each record alone: the same short records packed several to
# a window of 129 tokens and one to a window of 65 score the same loss.
python3 -c "
import json
words = ['one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
for i in range(60):
    a, b = words[i % 9], words[(i * 7 + 3) % 9]
    print(json.dumps({'prompt': f'### Question: What is {a} plus {b}?', 'completion': f' {a} and {b}.'}))
" > short.jsonl
for seq in 128 64; do
  "$STRATA_BIN" prepare-data --format jsonl --input short.jsonl --out short$seq --tokenizer "$base_dir" \
    --seq-len $seq --val-fraction 0 --overlong drop >short$seq.log || { cat short$seq.log; fail "prepare short$seq"; }
  "$STRATA_BIN" eval --from "$base_dir" --data "short$seq/train_*.bin" --seq-len $seq --document-masking \
    | tail -1 >short$seq.json
done
python3 - <<'PY'
import json
meta = {n: json.load(open(f"short{n}/meta.json"))["packing"]["train"] for n in (128, 64)}
assert meta[128]["records"] == meta[64]["records"] == 60 and meta[64]["windows"] == 60, meta
assert meta[128]["windows"] <= 30, meta
packed, alone = (json.load(open(f"short{n}.json")) for n in (128, 64))
assert packed["tokens"] == alone["tokens"], (packed, alone)
assert abs(packed["loss"] - alone["loss"]) <= 1e-5 * alone["loss"], (packed, alone)
print(f"60 records in {meta[128]['windows']} windows or one per window: loss {packed['loss']:.6f} = {alone['loss']:.6f}")
PY
expect_error "eval --document-masking: the shards matching 'data/val_*.bin' do not mark where documents start" \
  "$STRATA_BIN" eval --from "$base_dir" --data 'data/val_*.bin' --seq-len 64 --document-masking
expect_error "data.document_masking is on, but the shards of data.train 'data/train_*.bin' do not mark where documents start" \
  "$STRATA_BIN" train --config base.yaml --set job.run_dir=bad_docs --set data.document_masking=true
# The masked val loss falls from the base model's (eval on the same masked windows).
"$STRATA_BIN" eval --from "$base_dir" --data 'sft/val_*.bin' --seq-len 128 | tail -1 >eval_base.json
"$STRATA_BIN" eval --from sft1/checkpoints/hf-latest/adapter --data 'sft/val_*.bin' --seq-len 128 | tail -1 >eval_adapter.json
"$STRATA_BIN" eval --from sft1/checkpoints/hf-latest --data 'sft/val_*.bin' --seq-len 128 | tail -1 >eval_merged.json
python3 - <<'PY'
import json
base, adapter, merged = (json.load(open(f))["loss"] for f in ("eval_base.json", "eval_adapter.json", "eval_merged.json"))
print(f"masked val loss: base {base:.4f}, base + adapter {adapter:.4f}, merged {merged:.4f}")
assert adapter < base - 0.1, (base, adapter)
assert abs(adapter - merged) <= 1e-4 * merged, (adapter, merged)
PY
[ -f sft1/checkpoints/hf-latest/adapter/adapter_model.safetensors ] || fail "no PEFT adapter"

# Bad inputs.
expect_error "--format jsonl needs --tokenizer" \
  "$STRATA_BIN" prepare-data --format jsonl --input chat.jsonl --out bad1 --seq-len 64
expect_error "--format jsonl needs --seq-len (the run's data.seq_len) to pack records into windows; got 0" \
  "$STRATA_BIN" prepare-data --format jsonl --input chat.jsonl --out bad2 --tokenizer "$base_dir"
printf '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n{"prompt": "a"}\n' > bad.jsonl
expect_error "bad.jsonl:2: a record with keys \"prompt\" is none of the known kinds" \
  "$STRATA_BIN" prepare-data --format jsonl --input bad.jsonl --out bad3 --tokenizer "$base_dir" --seq-len 64 --chat-template "$template"
printf '{"text": "one"}\n{"messages": [{"role": "user", "content": 5}]}\n' > bad.jsonl
expect_error "bad.jsonl:2 message 0: \"content\" must be a string, got number" \
  "$STRATA_BIN" prepare-data --format jsonl --input bad.jsonl --out bad4 --tokenizer "$base_dir" --seq-len 64
printf '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' > chat1.jsonl
expect_error "chat1.jsonl:1: a \"messages\" record needs a chat template" \
  "$STRATA_BIN" prepare-data --format jsonl --input chat1.jsonl --out bad5 --tokenizer "$base_dir" --seq-len 64
printf '{"text": "a\\tb"}\n{not json}\n' > bad.jsonl
expect_error "bad.jsonl:2 is not valid JSON" \
  "$STRATA_BIN" prepare-data --format jsonl --input bad.jsonl --out bad6 --tokenizer "$base_dir" --seq-len 64
# Records longer than a window: truncated (counted) or dropped (counted).
python3 -c "import json; print(json.dumps({'prompt': 'Q', 'completion': ' word' * 200})); print(json.dumps({'text': 'short'}))" > long.jsonl
"$STRATA_BIN" prepare-data --format jsonl --input long.jsonl --out long_t --tokenizer "$base_dir" --seq-len 16 --val-fraction 0 >long_t.log
grep -q "1 truncated, 0 dropped" long_t.log || { cat long_t.log; fail "truncation not counted"; }
"$STRATA_BIN" prepare-data --format jsonl --input long.jsonl --out long_d --tokenizer "$base_dir" --seq-len 16 --val-fraction 0 --overlong drop >long_d.log
grep -q "0 truncated, 1 dropped" long_d.log || { cat long_d.log; fail "dropping not counted"; }
# Training on packed shards with another seq_len is refused.
expect_error "is packed in windows of 129 tokens, for data.seq_len 128, but data.seq_len is 32" \
  "$STRATA_BIN" train --config sft.yaml --set job.run_dir=bad7 --set data.seq_len=32
echo "sft: all checks passed"
