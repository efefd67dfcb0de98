#!/usr/bin/env bash
# End-to-end: sharded (FSDP), hybrid-sharded (HSDP: 2 shard groups of 2 ranks) and replicated
# data-parallel training on 1..4 ranks give the 1-rank loss curve for the same global batch
# (N = 3 exercises shard padding), and so does gradient accumulation; validation loss
# likewise. Tolerance: 1e-5 relative (fp32).
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
hsdp=(--set parallel.fsdp.shard_group_size=2)
run hsdp4 4 3 "${hsdp[@]}" --set parallel.fsdp.activation_checkpointing=full --set checkpoint.interval=5
run hsdp4_keep 4 3 "${hsdp[@]}" --set parallel.fsdp.activation_checkpointing=none
run hsdp4_accumulate 4 1 "${hsdp[@]}"
run hsdp4_tied 4 3 "${hsdp[@]}" --set model.tie_embeddings=true
run hsdp4_replicas 4 3 --set parallel.fsdp.shard_group_size=1
# Checkpoints are layout-free: HSDP 2x2's step 5 continues on FSDP over 3 ranks and replicated
# over 2, and FSDP 3's continues on HSDP 2x2.
run fsdp3_ckpt 3 4 --set checkpoint.interval=5
run from_hsdp_fsdp3 3 4 --set checkpoint.resume_path=hsdp4/checkpoints/step-0000005
run from_hsdp_dp2 2 6 --set parallel.fsdp.enabled=false --set checkpoint.resume_path=hsdp4/checkpoints/step-0000005
run from_fsdp3_hsdp4 4 3 "${hsdp[@]}" --set checkpoint.resume_path=fsdp3_ckpt/checkpoints/step-0000005

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

for name in ("fsdp2", "fsdp3", "fsdp4", "fsdp3_keep", "dp2", "dp4_accumulate", "accumulate4", "fsdp2_accumulate",
             "hsdp4", "hsdp4_keep", "hsdp4_accumulate", "hsdp4_replicas"):
    same("one", name)
same("tied1", "tied3")
same("tied1", "tied3_keep")
same("tied1", "hsdp4_tied")

def continues(reference, name, first):
    ref = [r for r in map(json.loads, open(f"{reference}/metrics.jsonl")) if "loss" in r]
    got = [r for r in map(json.loads, open(f"{name}/metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in got] == list(range(first, 11)), (name, [r["step"] for r in got])
    for r in got:
        x = ref[r["step"] - 1]["loss"]
        if abs(r["loss"] - x) > 1e-5 * abs(x):
            sys.exit(f"FAIL: {name} step {r['step']} loss {r['loss']!r} vs {reference} {x!r}")
    print(f"{name}: steps {first}-10 continue {reference}")
for name in ("from_hsdp_fsdp3", "from_hsdp_dp2", "from_fsdp3_hsdp4"):
    continues("one", name, 6)

# Traffic per step by group: FSDP moves everything within its one shard group; HSDP moves
# parameters and gradients within shard groups of 2 and averages each gradient shard across
# the 2 replicas once per step (the micro-batches accumulate first).
def comm(name):
    rows = [json.loads(line) for line in open(f"{name}/metrics.jsonl") if '"loss"' in line]
    return rows[-1]["comm_mb_shard"], rows[-1]["comm_mb_replica"]
fsdp_shard, fsdp_replica = comm("fsdp4")
assert fsdp_shard > 0 and fsdp_replica == 0, (fsdp_shard, fsdp_replica)
for name in ("hsdp4", "hsdp4_keep", "hsdp4_accumulate"):
    shard, replica = comm(name)
    assert shard > 0 and replica > 0, (name, shard, replica)
    print(f"{name}: comm_mb_shard {shard:.3f}, comm_mb_replica {replica:.3f} (fsdp4: {fsdp_shard:.3f}, 0)")
# Accumulating 3 micro-batches triples the shard-group traffic, not the replica all-reduce.
assert abs(comm("hsdp4_accumulate")[1] - comm("hsdp4")[1]) < 1e-9, (comm("hsdp4_accumulate"), comm("hsdp4"))
loss = curve("one")[0]
assert loss[-1] < loss[0], loss
PY

# Shard sizes in the start-up report: ceil(P / N) per unit.
grep -q "unit layers.0: 12352 elements, shard 4118 per rank" fsdp3.log || { cat fsdp3.log; fail "no shard report"; }
grep -q "unit layers.0: 12352 elements, shard 3088 per rank" fsdp4.log || fail "wrong shard size for N=4"
grep -q "replicated data parallel" dp2.log || fail "dp2 did not run replicated"
grep -qF "fsdp: hybrid sharding (shard_group_size 2): 2 shard groups of 2 rank(s), replicas of each other; each rank holds 1/2 of the parameters, gradients and AdamW state; shard groups [0-1] on $(hostname), [2-3] on $(hostname); replica groups (gradient shards averaged once per step) [0,2], [1,3]" hsdp4.log ||
  { cat hsdp4.log; fail "no hybrid sharding layout in the start-up report"; }
grep -q "unit layers.0: 12352 elements, shard 6176 per rank" hsdp4.log || fail "wrong shard size for HSDP 2x2"
grep -q "^fsdp: sharded over all 4 rank(s) (shard_group_size world)" fsdp4.log || fail "no FSDP layout line"

# The HF export written under HSDP (each file by one rank) holds the model one process trains.
for run_dir in one hsdp4; do
  "$STRATA_BIN" eval --from "$run_dir/checkpoints/hf-latest" --data 'data/val_*.bin' --seq-len 32 | tail -1 >"eval_$run_dir.json"
done
python3 - eval_one.json eval_hsdp4.json <<'PY'
import json, sys
a, b = (json.load(open(p))["loss"] for p in sys.argv[1:])
assert abs(a - b) <= 1e-5 * abs(a), (a, b)
print(f"HF export under HSDP: eval loss {b!r} vs one process {a!r}")
PY

# Layouts that do not fit, on every rank.
expect_error "[rank 3] error: config error: parallel.fsdp.shard_group_size = 3 does not divide the world size 4" \
  mpirun --oversubscribe -np 4 "$STRATA_BIN" train --config job.yaml --set parallel.fsdp.shard_group_size=3 --set training.micro_batch_size=3
grep -qF "[rank 0] error: config error: parallel.fsdp.shard_group_size = 3 does not divide the world size 4" out.txt ||
  fail "rank 0 silent"
expect_error "parallel.fsdp.shard_group_size = 'half' must be world, node or a positive number of ranks" \
  "$STRATA_BIN" train --config job.yaml --set parallel.fsdp.shard_group_size=half
expect_error "parallel.fsdp.shard_group_size = node needs parallel.fsdp.enabled: true" \
  "$STRATA_BIN" train --config job.yaml --set parallel.fsdp.shard_group_size=node --set parallel.fsdp.enabled=false

# An error on every rank: each rank reports it, the job fails.
expect_error "[rank 1] error: config error: unknown key model.dimm" \
  mpirun --oversubscribe -np 2 "$STRATA_BIN" train --config job.yaml --set model.dimm=3
grep -qF "[rank 0] error: config error: unknown key model.dimm" out.txt || fail "rank 0 silent"
echo "data_parallel: all checks passed"
