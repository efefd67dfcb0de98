#!/usr/bin/env bash
# End-to-end Hugging Face interop: the last-step export checked field by field against
# docs/formats.md (safetensors layout, index, config.json, tokenizer files), bf16 and
# fp32-kept keys, multi-shard exports byte-identical whether 1 or 3 ranks wrote them, import
# through resume_path giving the same validation loss as the checkpoint it came from (1 and 3
# ranks), import errors, export retention, and a failing export on one rank.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null

cat > job.yaml <<YAML
job: {name: hf, run_dir: run, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 10, global_batch_size: 12, micro_batch_size: 2, eval_interval: 10, eval_batches: 1, log_interval: 5}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 10, last_save_model_only: false}
YAML

# check_export DIR DTYPE TIED: the export checklist of docs/formats.md, in plain Python (json + struct).
check_export() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, os, struct, sys
d, dtype, tied = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
size = {"F32": 4, "BF16": 2, "F16": 2}
files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
assert "model.safetensors" not in files, "stray model.safetensors next to shards"
n = len(files)
assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], files
index = json.load(open(f"{d}/model.safetensors.index.json"))
assert set(index) >= {"metadata", "weight_map"}
seen, total = {}, 0
for f in files:
    raw = open(f"{d}/{f}", "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert hlen % 8 == 0, "header not padded to 8"
    text = raw[8:8 + hlen].decode()
    assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" "))), "padding is not spaces"
    header = json.loads(text)
    assert json.dumps(header, separators=(",", ":")) or True
    assert text.rstrip(" ").find(": ") < 0 and text.rstrip(" ").find(", ") < 0, "header JSON not compact"
    assert header.pop("__metadata__") == {"format": "pt"}
    offset = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = e["data_offsets"]
        assert begin == offset, f"gap or overlap at {name}"
        count = 1
        for s in e["shape"]:
            count *= s
        assert end - begin == count * size[e["dtype"]], f"byte length of {name}"
        offset = end
        seen[name] = (f, e["dtype"], e["shape"])
        total += end - begin
    assert 8 + hlen + offset == len(raw), f"trailing bytes in {f}"
assert index["metadata"]["total_size"] == total, (index["metadata"]["total_size"], total)
assert index["weight_map"] == {k: v[0] for k, v in seen.items()}, "weight_map does not match the files"
assert ("lm_head.weight" in seen) == (not tied)
assert all(k.startswith("model.") or k == "lm_head.weight" for k in seen)
c = json.load(open(f"{d}/config.json"))
raw_config = open(f"{d}/config.json").read()
assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings"):
    assert isinstance(c[k], int) and not isinstance(c[k], bool), k
assert c["tie_word_embeddings"] is tied
assert c["rope_scaling"] is None and c["rope_parameters"]["rope_theta"] == c["rope_theta"]
assert '"rope_theta": 10000.0' in raw_config and '"rms_norm_eps": 1e-05' in raw_config, "floats as floats"
assert c["torch_dtype"] == c["dtype"] == dtype
assert seen["model.embed_tokens.weight"][1] == st
assert seen["model.layers.0.self_attn.q_proj.weight"][2] == [c["num_attention_heads"] * c["head_dim"], c["hidden_size"]]
g = json.load(open(f"{d}/generation_config.json"))
assert g["bos_token_id"] == c["bos_token_id"] == 1 and g["eos_token_id"] == c["eos_token_id"] == 2
for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert os.path.getsize(f"{d}/{f}") > 0, f
tc = json.load(open(f"{d}/tokenizer_config.json"))
assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["split_special_tokens"] is True, tc
tj = json.load(open(f"{d}/tokenizer.json"))
assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] is True and tj["model"]["merges"], tj["model"].keys()
assert list(tj["model"]["vocab"].values()) == list(range(len(tj["model"]["vocab"]))), "vocab not in id order"
print(f"export {d}: {n} shard(s), {len(seen)} tensors, {total} bytes: checklist ok")
PY
}

# --- The last-step export (on by default), fp32, untied and tied.
train 2 run
[ "$(readlink run/checkpoints/hf-latest)" = hf-0000010 ] || fail "hf-latest is not a relative link to hf-0000010"
check_export run/checkpoints/hf-latest float32 false || fail "export checklist"
train 1 tied --set model.tie_embeddings=true
check_export tied/checkpoints/hf-latest float32 true || fail "tied export checklist"

# --- bf16, with norms kept in fp32; several shards; 1 vs 3 writers byte-identical. Both start
# from the same weights and take one step at lr 1e-30 (no weight changes by a representable
# amount), so the exports must hold identical bytes.
probe=(--set training.steps=1 --set training.eval_interval=1 --set optimizer.lr=1e-30)
for np in 1 3; do
  train $np bf$np --set checkpoint.export_dtype=bfloat16 --set 'checkpoint.export_fp32_keys=["*norm*"]' \
    --set checkpoint.hf_max_shard_size=20KB "${probe[@]}" \
    --set checkpoint.resume_path=run/checkpoints/step-0000010 --set checkpoint.resume_model_only=true
done
python3 - <<'PY' || fail "bf16 dtypes"
import json, struct
d = "bf1/checkpoints/hf-latest"
index = json.load(open(f"{d}/model.safetensors.index.json"))
assert len(set(index["weight_map"].values())) > 3, "expected several shards"
for name, f in index["weight_map"].items():
    raw = open(f"{d}/{f}", "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    dtype = json.loads(raw[8:8 + n])[name]["dtype"]
    assert dtype == ("F32" if "norm" in name else "BF16"), (name, dtype)
PY
check_export bf1/checkpoints/hf-latest bfloat16 false || fail "bf16 export checklist"
for f in bf1/checkpoints/hf-latest/*; do
  cmp "$f" "bf3/checkpoints/hf-latest/$(basename "$f")" || fail "export by 3 ranks differs: $(basename "$f")"
done
echo "exports: bf16 with fp32 norms, $(ls bf1/checkpoints/hf-latest/*.safetensors | wc -l) shards, 1 rank == 3 ranks"

# --- Import: the exported weights give the validation loss of the checkpoint they came from.
train 1 from_ck --set checkpoint.resume_path=run/checkpoints/step-0000010 --set checkpoint.resume_model_only=true "${probe[@]}"
for np in 1 3; do
  train $np from_hf$np --set checkpoint.resume_path=run/checkpoints/hf-latest "${probe[@]}"
  grep -q "resume: loaded model from run/checkpoints/hf-latest because checkpoint.resume_path is a Hugging Face model directory" from_hf$np.log ||
    { cat from_hf$np.log; fail "no HF resume line"; }
done
python3 - <<'PY' || fail "imported weights give another validation loss"
import json
def val(d):
    return [json.loads(l)["val_loss"] for l in open(f"{d}/metrics.jsonl") if "val_loss" in l][0]
a, b, c = val("from_ck"), val("from_hf1"), val("from_hf3")
assert a == b, (a, b)                      # same world size: bit-identical
assert abs(c - a) <= 1e-6 * abs(a), (a, c) # 3 ranks: another summation order
print(f"import: val_loss {a!r} (checkpoint) == {b!r} (HF, 1 rank) ~ {c!r} (HF, 3 ranks)")
PY

# --- A run started from an HF directory exports in that directory's shard layout.
train 1 relayout --set checkpoint.resume_path=bf1/checkpoints/hf-latest "${probe[@]}"
python3 - <<'PY' || fail "the export does not keep the source's shard layout"
import json
a = json.load(open("bf1/checkpoints/hf-latest/model.safetensors.index.json"))["weight_map"]
b = json.load(open("relayout/checkpoints/hf-latest/model.safetensors.index.json"))["weight_map"]
assert a == b and len(set(b.values())) > 3, (len(set(a.values())), len(set(b.values())))
PY

# --- A config without model keys takes the shape from the HF directory's config.json.
grep -v '^model:' job.yaml >nomodel.yaml
"$STRATA_BIN" train --config nomodel.yaml --set job.run_dir=nomodel --set checkpoint.resume_path=run/checkpoints/hf-latest \
  "${probe[@]}" >nomodel.log 2>&1 || { cat nomodel.log; fail "training from an HF dir without model keys"; }
grep -q "model: from run/checkpoints/hf-latest/config.json (the config sets no model keys)" nomodel.log ||
  { cat nomodel.log; fail "model shape not taken from config.json"; }
grep -q "21 tensors loaded, 0 initialised" nomodel.log || fail "not every tensor was loaded"

# --- Import errors: another shape, missing and unexpected tensors.
expect_error "model.dim = 64 but hidden_size = 32" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=e1 --set model.dim=64 --set checkpoint.resume_path=run/checkpoints/hf-latest
cp -rL run/checkpoints/hf-latest broken
python3 - <<'PY'
import json
p = "broken/model.safetensors.index.json"
index = json.load(open(p))
del index["weight_map"]["model.norm.weight"]
index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = index["weight_map"]["lm_head.weight"]
json.dump(index, open(p, "w"))
PY
expect_error "missing: model.norm.weight" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=e2 --set checkpoint.resume_path=broken
grep -q "unexpected: model.layers.0.self_attn.q_proj.bias" out.txt || { cat out.txt; fail "unexpected key not named"; }

# --- Interval exports, retention, and a failing export on one rank (async): every rank stops
# with the same message and nothing is committed.
train 1 keep --set checkpoint.hf_export_interval=2 --set checkpoint.hf_max_keep=2
sleep 1
[ "$(ls -d keep/checkpoints/hf-0* | tr '\n' ' ')" = "keep/checkpoints/hf-0000008 keep/checkpoints/hf-0000010 " ] ||
  { ls keep/checkpoints; fail "hf_max_keep"; }
if STRATA_TEST_FAIL_SAVE=1@4 mpirun --oversubscribe -np 2 "$STRATA_FAULTS_BIN" train --config job.yaml \
  --set job.run_dir=failing --set checkpoint.hf_export_interval=2 --set checkpoint.async_mode=async \
  >failing.log 2>&1; then cat failing.log; fail "a failed export exited 0"; fi
for r in 0 1; do
  grep -q "\[rank $r\] error: HF export at step 4 failed on rank 1: cannot write rank 1 file: injected failure" failing.log ||
    { cat failing.log; fail "rank $r did not report the failed export"; }
done
[ "$(readlink failing/checkpoints/hf-latest)" = hf-0000002 ] || fail "hf-latest moved after a failed export"
[ ! -e failing/checkpoints/hf-0000004 ] && [ ! -e failing/checkpoints/hf-0000004.incomplete ] ||
  fail "the failed export left a directory"
# --- eval / convert / generate over every source kind.
last_loss() { tail -1 "$1" | python3 -c "import json, sys; print(repr(json.load(sys.stdin)['loss']))"; }
"$STRATA_BIN" eval --from run/checkpoints/step-0000010 --data 'data/val_*.bin' --seq-len 32 >eval_ck.txt
"$STRATA_BIN" eval --from run/checkpoints/hf-latest --data 'data/val_*.bin' --seq-len 32 >eval_hf.txt
[ "$(last_loss eval_ck.txt)" = "$(last_loss eval_hf.txt)" ] || fail "eval of the export differs from eval of the checkpoint"
grep -q '"tokens":' eval_ck.txt || fail "eval's last line is not the JSON result"
"$STRATA_BIN" convert --from run/checkpoints/step-0000010 --to-hf converted >/dev/null
for f in run/checkpoints/hf-latest/*.safetensors; do
  cmp "$f" "converted/$(basename "$f")" || fail "convert --to-hf differs from the training export"
done
"$STRATA_BIN" convert --from converted --to-strata back >/dev/null
"$STRATA_BIN" eval --from back --data 'data/val_*.bin' --seq-len 32 >eval_back.txt
[ "$(last_loss eval_ck.txt)" = "$(last_loss eval_back.txt)" ] || fail "HF -> Strata conversion changed the model"
expect_error "converted exists and is not empty" "$STRATA_BIN" convert --from back --to-hf converted
expect_error "--seq-len 64 exceeds the model's max_seq_len 32" \
  "$STRATA_BIN" eval --from back --data 'data/val_*.bin' --seq-len 64
expect_error "no_such_*.bin" "$STRATA_BIN" eval --from back --data 'no_such_*.bin'
"$STRATA_BIN" generate --from converted --prompt "The" --temperature 0 --max-new-tokens 8 >g1.txt
"$STRATA_BIN" generate --from run/checkpoints --prompt "The" --temperature 0 --max-new-tokens 8 >g2.txt
[ -s g1.txt ] && cmp g1.txt g2.txt || fail "greedy generation differs between the export and the checkpoint"
echo "eval, convert, generate: consistent across Strata checkpoints and HF directories"

# --- The export's tokenizer.json encodes as Strata's tokenizer: a plain-Python BPE over its
# vocab and merges (the `tokenizers` algorithm: dummy prefix, byte fallback, lowest-rank pair
# first) gives, for every document of the corpus, the ids prepare-data wrote with the same
# tokenizer.model. (Without it, transformers needs protobuf to read tokenizer.model, and its
# LlamaTokenizer drops the dummy prefix of a text that starts with a space.)
printf ' a leading space, <s> as text and \xe2\x96\x81' > edge.txt
"$STRATA_BIN" prepare-data --input edge.txt /usr/share/games/fortunes/fortunes --separator % \
  --tokenizer converted/tokenizer.model --val-fraction 0 --out tokenized >/dev/null
python3 - converted/tokenizer.json tokenized/train_000000.bin edge.txt /usr/share/games/fortunes/fortunes <<'PY' ||
import json, struct, sys
tj = json.load(open(sys.argv[1]))
vocab = tj["model"]["vocab"]
rank = {tuple(m.split(" ")): i for i, m in enumerate(tj["model"]["merges"])}
def encode(text):
    word = []
    for ch in "\u2581" + text.replace(" ", "\u2581"):
        word += [ch] if ch in vocab else ["<0x%02X>" % b for b in ch.encode()]
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(zip(word, word[1:])) if p in rank]
        if not pairs:
            return [1] + [vocab[w] for w in word]
        _, i = min(pairs)
        word[i:i + 2] = [word[i] + word[i + 1]]
raw = open(sys.argv[2], "rb").read()
count = struct.unpack("<256i", raw[:1024])[2]
stream = list(struct.unpack("<%dH" % count, raw[1024:1024 + 2 * count]))
docs = []
for t in stream:
    if t == 1:
        docs.append([])
    docs[-1].append(t)
texts = [open(sys.argv[3], encoding="utf-8").read()]
doc = []
lines = open(sys.argv[4], encoding="utf-8", newline="").read().split("\n")
for i, line in enumerate(lines):
    line += "\n" if i + 1 < len(lines) else ""
    if line.rstrip("\n").rstrip("\r") == "%":
        texts.append("".join(doc))
        doc = []
    else:
        doc.append(line)
texts.append("".join(doc))
texts = [t for t in texts if t.strip(" \t\r\n")]
assert len(docs) == len(texts), (len(docs), len(texts))
bad = [t for t, d in zip(texts, docs) if encode(t) != d]
assert not bad, "tokenizer.json encodes %d of %d documents differently, e.g. %r" % (len(bad), len(texts), bad[0][:60])
print("tokenizer.json: %d documents encode as Strata's tokenizer does" % len(texts))
PY
  fail "the export's tokenizer.json does not encode as the tokenizer"

# --- Hub specs (downloads: tests/e2e/hub.sh): offline with an empty cache, the error says what
# was parsed and what is missing, without touching the network.
HF_HUB_OFFLINE=1 HF_HUB_CACHE="$work/empty-cache" expect_error \
  "Hub spec 'hf://owner/repo/sub@v1' (repo owner/repo, subfolder sub, revision v1) is not available: HF_HUB_OFFLINE is set" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=hub --set checkpoint.resume_path=hf://owner/repo/sub@v1
expect_error "Hub spec 'hf://owner/repo/../x': path segment '..' is not allowed" \
  "$STRATA_BIN" eval --from 'hf://owner/repo/../x' --data 'data/val_*.bin'
echo "hf_interop: all checks passed"
