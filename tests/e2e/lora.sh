#!/usr/bin/env bash
# End-to-end converters: LoRA fine-tuning of an HF export (no model keys: the shape comes from
# its config.json), base weights bit-identical after training, the PEFT adapter's files, keys,
# shapes and adapter_config (docs/formats.md), merged export == base + adapter in eval, 1 == 2
# == 3 ranks, exact resume, loading an adapter through resume_path and additional_load_paths,
# the errors (a key from two sources, an adapter of another rank), and int8 QAT's export.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null

# The base: 8 steps of a small model, exported to HF.
cat > base.yaml <<YAML
job: {name: base, run_dir: base, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 8, global_batch_size: 12, micro_batch_size: 2, eval_interval: 0, log_interval: 4}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 8}
YAML
"$STRATA_BIN" train --config base.yaml >base.log 2>&1 || { cat base.log; fail "base run failed"; }
base_dir=$(readlink -f base/checkpoints/hf-latest)

# LoRA on every block linear; no model keys.
cat > lora.yaml <<YAML
job: {name: lora, run_dir: lora, seed: 3}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 6, global_batch_size: 12, micro_batch_size: 2, eval_interval: 6, eval_batches: 1, log_interval: 1}
optimizer: {lr: 1.0e-2}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 3, keep_latest_k: 0, last_save_model_only: false, resume_path: $base_dir}
converters: [{type: lora, rank: 4, alpha: 8, target_modules: [wq, wk, wv, wo, w1, w2, w3], export: both}]
YAML
TRAIN_CONFIG=lora.yaml  # for train (lib/common.sh)
losses() { python3 -c "
import json
for line in open('$1/metrics.jsonl'):
    r = json.loads(line)
    if 'loss' in r: print(r['step'], repr(r['loss']))"; }
eval_loss() {  # FROM: the JSON loss line of strata eval
  "$STRATA_BIN" eval --from "$1" --data "data/val_*.bin" --max-tokens 2048 >eval.log 2>&1 || { cat eval.log; fail "eval --from $1"; }
  tail -1 eval.log
}

train 1 lora
grep -q "converter: lora (r 4, alpha 8, scale 2, dropout 0, targets wq wk wv wo w1 w2 w3; export both" lora.log ||
  { cat lora.log; fail "no converter line"; }
grep -q "model: from $base_dir/config.json" lora.log || { cat lora.log; fail "shape not from config.json"; }
grep -q "21 tensors loaded, 28 initialised" lora.log || { cat lora.log; fail "LoRA factors not initialised alone"; }
export=$(readlink -f lora/checkpoints/hf-latest)

# The export: merged model on top, PEFT adapter in adapter/ naming the base; keys, shapes,
# config exactly as docs/formats.md; base weights in the last checkpoint bit-identical.
python3 - "$export" "$base_dir" lora/checkpoints/step-0000006 <<'PY'
import json, os, struct, sys
export, base, step = sys.argv[1:]
def read(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]) for k, v in header.items()}, meta
def model(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.startswith("model") and f.endswith(".safetensors"):
            out.update(read(os.path.join(d, f))[0])
    return out
merged, original = model(export), model(base)
assert sorted(merged) == sorted(original), "the merged export has other keys than the base"
assert not any("lora" in k for k in merged)
changed = [k for k in merged if merged[k][2] != original[k][2]]
targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
assert sorted(changed) == sorted(k for k in original if any(t in k for t in targets)), changed
adapter, meta = read(os.path.join(export, "adapter", "adapter_model.safetensors"))
assert meta == {"format": "pt"}, meta
layers, dim, ffn, kv = 2, 32, 96, 16
expected = {}
for i in range(layers):
    for mod, (out_f, in_f) in {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv, dim), "self_attn.v_proj": (kv, dim),
                               "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim),
                               "mlp.down_proj": (dim, ffn)}.items():
        expected[f"base_model.model.model.layers.{i}.{mod}.lora_A.weight"] = [4, in_f]
        expected[f"base_model.model.model.layers.{i}.{mod}.lora_B.weight"] = [out_f, 4]
assert {k: v[1] for k, v in adapter.items()} == expected, sorted(adapter)
assert all(v[0] == "F32" for v in adapter.values())
config = json.load(open(os.path.join(export, "adapter", "adapter_config.json")))
assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM", config
assert config["base_model_name_or_path"] == base, (config["base_model_name_or_path"], base)
assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["lora_dropout"] == 0.0
assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
assert config["bias"] == "none" and config["use_rslora"] is False and config["use_dora"] is False
text = open(os.path.join(export, "adapter", "adapter_config.json")).read()
assert text == json.dumps(config, indent=2, sort_keys=True) + "\n", "not PEFT's json.dumps(indent=2, sort_keys=True)"
# The last checkpoint: base keys bit-identical to the HF base (fp32), optimizer state for the
# LoRA keys only.
m = json.load(open(os.path.join(step, "metadata.json")))
moments = [k for k in m["tensors"] if k.startswith("optimizer.")]
params = {k[len("optimizer."):].rsplit(".", 1)[0] for k in moments}
assert len(moments) == 2 * 28 and all(p.endswith((".lora_a", ".lora_b")) for p in params), sorted(params)
assert len(m["tensors"]) == 21 + 28 + 2 * 28
PY
[ "$(eval_loss "$export")" = "$(eval_loss "$export/adapter")" ] || fail "merged export and base + adapter differ"
[ "$(eval_loss "$export")" = "$(eval_loss lora/checkpoints)" ] || fail "merged export and the LoRA checkpoint differ"
[ "$(eval_loss "$export")" != "$(eval_loss "$base_dir")" ] || fail "LoRA changed nothing"
echo "lora: export both: merged == base + adapter == checkpoint"

# --- export: adapter: the unmerged base, bit-identical to the base export after training
# (frozen), with the adapter in adapter/ naming the export as its base.
train 1 beside --set converters.0.export=adapter --set training.steps=3
python3 - "$(readlink -f beside/checkpoints/hf-latest)" "$base_dir" <<'PY'
import json, os, sys
export, base = sys.argv[1:]
for f in sorted(os.listdir(base)):
    if f.startswith("model") and f.endswith(".safetensors"):
        assert open(os.path.join(export, f), "rb").read() == open(os.path.join(base, f), "rb").read(), f
config = json.load(open(os.path.join(export, "adapter", "adapter_config.json")))
assert config["base_model_name_or_path"] == export, config["base_model_name_or_path"]
assert not os.path.exists(os.path.join(export, "adapter_config.json")), "adapter files beside the model"
PY
[ "$(eval_loss beside/checkpoints/hf-latest/adapter)" = "$(eval_loss beside/checkpoints)" ] || fail "adapter export != checkpoint"
[ "$(eval_loss beside/checkpoints/hf-latest)" = "$(eval_loss "$base_dir")" ] || fail "the export's model is not the base"

# --- 2 and 3 ranks (FSDP: frozen base in each unit's second buffer) and hybrid sharding on 4
# (frozen buffers gathered within each shard group of 2) match 1 rank.
train 2 lora2
train 3 lora3
train 4 lora_hsdp --set parallel.fsdp.shard_group_size=2 --set training.micro_batch_size=1
python3 - <(losses lora) <(losses lora2) <(losses lora3) <(losses lora_hsdp) <<'PY'
import sys
runs = [dict(l.split() for l in open(p)) for p in sys.argv[1:]]
for other in runs[1:]:
    for step, loss in runs[0].items():
        a, b = float(loss), float(other[step])
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
PY

# --- Exact resume with dropout: 6 steps straight vs 3 + relaunch of the same command.
train 1 drop --set converters.0.dropout=0.1 --set training.steps=3
train 1 drop --set converters.0.dropout=0.1
train 1 drop_straight --set converters.0.dropout=0.1
[ "$(losses drop)" = "$(losses drop_straight)" ] || { losses drop; losses drop_straight; fail "resume with dropout is not exact"; }
[ "$(losses drop)" != "$(losses lora)" ] || fail "dropout had no effect"

# --- adapter_only: checkpoints hold A, B and their moments plus the base's identity; the
# relaunch reloads and verifies the base and continues exactly; a changed base is refused.
train 1 ao --set converters.0.save=adapter_only --set training.steps=3
python3 - ao/checkpoints/step-0000003/metadata.json "$base_dir" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keys = list(m["tensors"])
assert len(keys) == 28 * 3 and all(k.split(".")[-1] in ("lora_a", "lora_b", "exp_avg", "exp_avg_sq") for k in keys), keys
bases = m["adapter_only"]["bases"]
assert len(bases) == 1 and bases[0]["source"] == sys.argv[2] and len(bases[0]["fingerprint"]) == 64, bases
PY
train 1 ao --set converters.0.save=adapter_only
grep -q "adapter-only, its base reloaded and verified" ao.log || { cat ao.log; fail "adapter-only resume"; }
[ "$(losses ao)" = "$(losses lora)" ] || { losses ao; losses lora; fail "adapter-only resume is not exact"; }
[ "$(eval_loss ao/checkpoints)" = "$(eval_loss lora/checkpoints)" ] || fail "eval of an adapter-only checkpoint"
cp -r "$base_dir" changed_base
train 1 ao_changed --set converters.0.save=adapter_only --set training.steps=3 \
  --set checkpoint.resume_path="$work/changed_base"
python3 - changed_base/model*.safetensors <<'PY'
import sys
f = open(sys.argv[-1], "r+b")
f.seek(-4, 2)
f.write(b"\x00\x00\x80\x3f")  # the last float becomes 1.0
PY
expect_error "was saved on base $work/changed_base with fingerprint" \
  "$STRATA_BIN" train --config lora.yaml --set job.run_dir=ao_changed --set converters.0.save=adapter_only \
  --set checkpoint.resume_path="$work/changed_base"
grep -qF "the base model changed" out.txt || { cat out.txt; fail "changed base not explained"; }

# --- Loading the adapter: resume_path = the adapter (its base comes along), and
# resume_path = base + additional_load_paths = [adapter]: both start from the fine-tuned model.
probe=(--set training.steps=1 --set optimizer.lr=1e-12 --set checkpoint.enable=false)
train 1 from_peft "${probe[@]}" --set checkpoint.resume_path="$export/adapter"
grep -q "because checkpoint.resume_path is a PEFT adapter on base $base_dir" from_peft.log || { cat from_peft.log; fail "adapter as resume_path"; }
grep -q "load: $export/adapter (PEFT adapter): 28 tensors" from_peft.log || { cat from_peft.log; fail "adapter tensors"; }
train 1 from_both "${probe[@]}" --set "checkpoint.additional_load_paths=[$export/adapter]"
grep -q "49 tensors loaded, 0 initialised" from_both.log || { cat from_both.log; fail "base + adapter not fully loaded"; }
val() { grep -o "val_loss [0-9.]*" "$1" | tail -1; }
[ "$(val from_peft.log)" = "$(val from_both.log)" ] || fail "adapter via resume_path and via additional_load_paths differ"

# --- Errors.
expect_error "is provided by two sources: $base_dir and $base_dir (Hugging Face model)" \
  "$STRATA_BIN" train --config lora.yaml --set job.run_dir=dup "${probe[@]}" --set "checkpoint.additional_load_paths=[$base_dir]"
expect_error "does not match the run's LoRA converter:" \
  "$STRATA_BIN" train --config lora.yaml --set job.run_dir=r2 "${probe[@]}" --set converters.0.rank=2 \
  --set checkpoint.resume_path="$export/adapter"
grep -qF "r = 4 but the run's LoRA rank is 2" out.txt || { cat out.txt; fail "rank mismatch not named"; }
expect_error "is a PEFT LoRA adapter, but the run has no LoRA converter" \
  "$STRATA_BIN" train --config lora.yaml --set job.run_dir=nolora "${probe[@]}" --set converters=[] \
  --set "checkpoint.additional_load_paths=[$export/adapter]"
expect_error "converters.0.target_modules = 'q_proj' is not one of: wq, wk, wv, wo, w1, w2, w3" \
  "$STRATA_BIN" train --config lora.yaml --set "converters.0.target_modules=[q_proj]"
expect_error "converters.0.save = adapter_only needs a converter that owns the trained keys, and int8_qat owns none" \
  "$STRATA_BIN" train --config lora.yaml --set "converters=[{type: int8_qat, save: adapter_only}]"
expect_error "converters.1.type = lora must come before int8_qat" \
  "$STRATA_BIN" train --config lora.yaml --set "converters=[{type: int8_qat}, {type: lora}]"

# --- int8 QAT: the export holds the quantise-dequantised weights (each row an integer multiple
# of max|row| / 127).
cat > qat.yaml <<YAML
job: {name: qat, run_dir: qat, seed: 5}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 4, global_batch_size: 12, micro_batch_size: 2, eval_interval: 0, log_interval: 2}
parallel: {threads_per_rank: 1}
converters: [{type: int8_qat, target_modules: [w1, w2, w3]}]
YAML
"$STRATA_BIN" train --config qat.yaml >qat.log 2>&1 || { cat qat.log; fail "QAT run failed"; }
python3 - qat/checkpoints/hf-latest <<'PY'
import json, os, struct, sys, array
d = sys.argv[1]
for f in sorted(os.listdir(d)):
    if not f.endswith(".safetensors"):
        continue
    raw = open(os.path.join(d, f), "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    for key, e in header.items():
        values = array.array("f", raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]])
        rows, cols = e["shape"] if len(e["shape"]) == 2 else (1, len(values))
        quantised = "mlp." in key
        for r in range(rows):
            row = values[r * cols:(r + 1) * cols]
            scale = max(abs(v) for v in row) / 127
            steps = [v / scale for v in row]
            on_grid = all(abs(s - round(s)) < 1e-3 for s in steps)
            assert on_grid == quantised or (not quantised and len(set(row)) <= 1), (key, r)
print("qat export on the int8 grid")
PY
echo "lora: ok"
