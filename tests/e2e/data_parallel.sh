#!/usr/bin/env bash
# End-to-end: sharded (FSDP) and replicated data-parallel training on 1..4 ranks give the
# 1-rank loss curve for the same global batch (N = 3 exercises shard padding), and so does
# gradient accumulation; validation loss likewise. Tolerance: 1e-5 relative (fp32).
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
command -v mpirun >/dev/null || fail "mpirun not found (scripts/setup.sh installs openmpi-bin)"

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null
cat > job.yaml <<YAML
job: {name: dp, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 10, global_batch_size: 12, micro_batch_size: 12, eval_interval: 5, eval_batches: 1, log_interval: 1}
parallel: {threads_per_rank: 1}
YAML

# run NAME RANKS MICRO_BATCH [--set ...]
run() {
  local name=$1 ranks=$2 micro=$3; shift 3
  mpirun --oversubscribe -np "$ranks" "$STRATA_BIN" train --config job.yaml \
    --set job.run_dir="$name" --set training.micro_batch_size="$micro" "$@" >"$name.log" 2>&1 ||
    { cat "$name.log"; fail "run $name failed"; }
}
run one 1 12
run fsdp2 2 6
run fsdp3 3 4
run fsdp4 4 3
run fsdp3_keep 3 4 --set parallel.fsdp.activation_checkpointing=none
run dp2 2 6 --set parallel.fsdp.enabled=false
run dp4_accumulate 4 1 --set parallel.fsdp.enabled=false
run accumulate4 1 3
run fsdp2_accumulate 2 2
run tied1 1 12 --set model.tie_embeddings=true
run tied3 3 4 --set model.tie_embeddings=true
run tied3_keep 3 4 --set model.tie_embeddings=true --set parallel.fsdp.activation_checkpointing=none

python3 - <<'PY'
import json, sys

def curve(name):
    rows = [json.loads(line) for line in open(f"{name}/metrics.jsonl")]
    return ([r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r])

def same(reference, name):
    ref, got = curve(reference), curve(name)
    assert len(ref[0]) == len(got[0]) == 10 and len(ref[1]) == len(got[1]) == 2, (name, got)
    for kind, a, b in (("loss", ref[0], got[0]), ("val_loss", ref[1], got[1])):
        for step, (x, y) in enumerate(zip(a, b), 1):
            if abs(x - y) > 1e-5 * abs(x):
                sys.exit(f"FAIL: {name} {kind} #{step} = {y!r} vs {reference} {x!r}")
    print(f"{name}: matches {reference} (max rel diff "
          f"{max(abs(x - y) / abs(x) for x, y in zip(ref[0] + ref[1], got[0] + got[1])):.2e})")

for name in ("fsdp2", "fsdp3", "fsdp4", "fsdp3_keep", "dp2", "dp4_accumulate", "accumulate4", "fsdp2_accumulate"):
    same("one", name)
same("tied1", "tied3")
same("tied1", "tied3_keep")
loss = curve("one")[0]
assert loss[-1] < loss[0], loss
PY

# Shard sizes in the start-up report: ceil(P / N) per unit.
grep -q "unit layers.0: 12352 elements, shard 4118 per rank" fsdp3.log || { cat fsdp3.log; fail "no shard report"; }
grep -q "unit layers.0: 12352 elements, shard 3088 per rank" fsdp4.log || fail "wrong shard size for N=4"
grep -q "replicated data parallel" dp2.log || fail "dp2 did not run replicated"

# An error on every rank: each rank reports it, the job fails.
expect_error "[rank 1] error: config error: unknown key model.dimm" \
  mpirun --oversubscribe -np 2 "$STRATA_BIN" train --config job.yaml --set model.dimm=3
grep -qF "[rank 0] error: config error: unknown key model.dimm" out.txt || fail "rank 0 silent"
echo "data_parallel: all checks passed"
