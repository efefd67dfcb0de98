#!/usr/bin/env bash
# End-to-end: `strata train` as a user runs it — help, config errors through the CLI,
# --print-config, a short real run with its outputs, a multi-rank launch, and one job per run
# directory.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" --help | grep -q "train" || fail "--help lists no train"
"$STRATA_BIN" --help | grep -q "prepare-data" || fail "--help lists no prepare-data"
"$STRATA_BIN" train --help | grep -q -- "--set" || fail "train --help lists no --set"

# Data: a small corpus, a small tokenizer.
"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >prep.txt

cat > job.yaml <<YAML
job: {name: e2e, run_dir: run, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 20, global_batch_size: 8, micro_batch_size: 4, eval_interval: 10, eval_batches: 2, log_interval: 5}
parallel: {threads_per_rank: 1}
YAML

# Config errors reach the user as one message with the key and line, exit code 1.
expect_error "model.n_layer" "$STRATA_BIN" train --config job.yaml --set model.n_layer=3
expect_error "did you mean model.n_layers" "$STRATA_BIN" train --config job.yaml --set model.n_layer=3
printf 'model:\n  dim: abc\n' > bad.yaml
expect_error "bad.yaml:2" "$STRATA_BIN" train --config bad.yaml
expect_error "error: " "$STRATA_BIN" train --config bad.yaml
expect_error "does not exist" "$STRATA_BIN" train --config missing.yaml
expect_error "data/none_*.bin" "$STRATA_BIN" train --config job.yaml --set 'data.train=data/none_*.bin'
expect_error "checkpoint.keep_latest_k = -2 must be >= 0" "$STRATA_BIN" train --config job.yaml --set checkpoint.keep_latest_k=-2
expect_error "checkpoint.async_mode = 'later' is not one of: disabled, async" "$STRATA_BIN" train --config job.yaml --set checkpoint.async_mode=later
expect_error "model.vocab_size" "$STRATA_BIN" train --config job.yaml --set model.vocab_size=100

# --print-config prints the resolved YAML with overrides applied, and trains nothing.
"$STRATA_BIN" train --config job.yaml --set training.steps=3 --set job.run_dir=printed \
  --print-config >resolved.yaml
grep -q "steps: 3" resolved.yaml || fail "override not in --print-config"
[ ! -e printed ] || fail "--print-config created the run directory"
rm -rf run

# A real run: outputs in the run directory, loss logged, final line.
"$STRATA_BIN" train --config job.yaml >train.txt 2>&1 || { cat train.txt; fail "train failed"; }
grep -q "step 20/20" train.txt || { cat train.txt; fail "no final step line"; }
grep -q "val_loss" train.txt || fail "no eval line"
[ -s run/config.yaml ] || fail "no run/config.yaml"
[ -s run/samples.txt ] || fail "no run/samples.txt"
[ "$(grep -c '"loss"' run/metrics.jsonl)" -eq 5 ] || fail "expected 5 step rows (1,5,10,15,20)"
[ "$(grep -c '"val_loss"' run/metrics.jsonl)" -eq 2 ] || fail "expected 2 eval rows"
# Checkpointing is on by default: the final step saves the weights and `latest` names it.
[ "$(cat run/checkpoints/latest)" = step-0000020 ] || fail "no final checkpoint"
"$STRATA_BIN" inspect run/checkpoints --verify | grep -q "model only" || fail "final save is not model-only"
# The written config is a complete config: it runs as is.
"$STRATA_BIN" train --config run/config.yaml --print-config >/dev/null
# The plot script renders it.
"$STRATA_SOURCE_DIR/scripts/plot_metrics.py" run/metrics.jsonl -o metrics.png >/dev/null
[ -s metrics.png ] || fail "plot_metrics.py wrote no PNG"

# Device and precision: the start-up log says what runs (the CPU over MPI, in fp32, with the
# fused kernels). A GPU asked for where none is visible, and NCCL on the CPU, are refused.
for line in "device: cpu (cpu), backend mpi" \
    "precision: parameters float32 in compute, gradients reduced in float32" \
    "kernels: Strata's fused CPU kernels" "attention: fused CPU kernel" \
    "mfu: not reported (no peak known for cpu; set logging.peak_tflops)"; do
  grep -qF "$line" train.txt || { cat train.txt; fail "start-up log lacks: $line"; }
done
if "$STRATA_BIN" --version | grep -qE " 0 GPUs visible|CUDA: not built"; then
  expect_error "parallel.device is cuda, but this process sees no CUDA GPU" \
    "$STRATA_BIN" train --config job.yaml --set parallel.device=cuda --set job.run_dir=gpu
  expect_error "parallel.backend is nccl, but the device is the CPU" \
    "$STRATA_BIN" train --config job.yaml --set parallel.backend=nccl --set job.run_dir=gpu
fi
expect_error "parallel.backend = nccl needs CUDA tensors, but parallel.device is cpu" \
  "$STRATA_BIN" train --config job.yaml --set parallel.device=cpu --set parallel.backend=nccl
expect_error "needs parallel.fsdp.enabled: true" "$STRATA_BIN" train --config job.yaml \
  --set parallel.fsdp.enabled=false --set parallel.fsdp.mixed_precision.param_dtype=bfloat16
# bf16 mixed precision on one rank (FSDP over a world of one): the log says so, and the loss
# curve stays within 1e-3 relative of fp32's on this model (measured: 2.2e-4 at most).
"$STRATA_BIN" train --config job.yaml --set job.run_dir=bf16 --set checkpoint.enable=false \
  --set parallel.fsdp.mixed_precision.param_dtype=bfloat16 >bf16.txt 2>&1 ||
  { cat bf16.txt; fail "bf16 train failed"; }
grep -qF "precision: parameters bfloat16 in compute" bf16.txt || fail "no bf16 precision line"
grep -qF "kernels: the ATen composition" bf16.txt || fail "bf16 should not use the fp32 kernels"
python3 - run/metrics.jsonl bf16/metrics.jsonl <<'PY' || fail "bf16 loss curve differs from fp32"
import json, sys
rows = [{r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r} for p in sys.argv[1:]]
worst = max(abs(rows[1][s] - l) / abs(l) for s, l in rows[0].items())
print(f"bf16 vs fp32: largest relative loss difference {worst:.2e} over {len(rows[0])} steps")
sys.exit(0 if worst < 1e-3 and len(rows[0]) == len(rows[1]) else 1)
PY

# Sizes are checked before anything is allocated: the start-up log shows the estimate and its
# margin; a model that cannot fit stops within seconds on every rank, naming the key that makes
# it large; sizes beyond 2^31 stop at validation; the override only reports.
grep -q "^memory: estimate .* per rank (parameters .*available per rank .*; margin " train.txt ||
  { cat train.txt; fail "no memory estimate in the start-up log"; }
started=$SECONDS
expect_error "model.n_layers=100000000" "$STRATA_BIN" train --config job.yaml \
  --set model.n_layers=100000000 --set job.run_dir=huge
[ $((SECONDS - started)) -le 20 ] || fail "the memory check took $((SECONDS - started)) s to refuse"
grep -q "error: the memory check failed: config error: the run does not fit in memory: about " out.txt ||
  { cat out.txt; fail "no memory message"; }
grep -q "^HINT: make model.n_layers smaller.*--set parallel.skip_memory_check=true" out.txt ||
  { cat out.txt; fail "no hint with the override"; }
expect_error "model.n_layers=100000000" mpirun --oversubscribe -np 2 "$STRATA_BIN" train \
  --config job.yaml --set model.n_layers=100000000 --set job.run_dir=huge
[ "$(grep -c "error: the memory check failed on rank 0: config error: the run does not fit" out.txt)" -eq 2 ] ||
  { cat out.txt; fail "not every rank reported the memory check"; }
expect_error "model.vocab_size = 1000000000000 exceeds 2147483648 (2^31)" "$STRATA_BIN" train \
  --config job.yaml --set model.vocab_size=1000000000000
expect_error "model.max_seq_len = 1000000000000 exceeds" "$STRATA_BIN" train --config job.yaml \
  --set model.max_seq_len=1000000000000
"$STRATA_BIN" train --config job.yaml --set job.run_dir=unchecked --set parallel.skip_memory_check=true \
  --set training.steps=1 --set training.eval_interval=0 --set checkpoint.enable=false >unchecked.txt 2>&1 ||
  { cat unchecked.txt; fail "a run with parallel.skip_memory_check=true failed"; }
grep -q "^memory: .*(not checked: parallel.skip_memory_check is true)" unchecked.txt ||
  { cat unchecked.txt; fail "the override is not reported"; }

# eval and generate refuse arguments they used to replace or accept silently.
for n in 0 -4; do
  expect_error "eval --seq-len $n: the window length must be a positive number of tokens" \
    "$STRATA_BIN" eval --from run/checkpoints --data 'data/val_*.bin' --seq-len "$n"
done
expect_error "eval --max-tokens -1: the number of tokens to score must be >= 0" \
  "$STRATA_BIN" eval --from run/checkpoints --data 'data/val_*.bin' --max-tokens -1
expect_error "eval --max-tokens 10 is less than one window of 32 tokens" \
  "$STRATA_BIN" eval --from run/checkpoints --data 'data/val_*.bin' --max-tokens 10
expect_error "generate --max-new-tokens -1: the number of tokens to sample must be >= 0" \
  "$STRATA_BIN" generate --from run/checkpoints --prompt The --max-new-tokens -1
for t in -1 inf nan; do
  expect_error "generate --temperature $t: the temperature must be a finite number >= 0" \
    "$STRATA_BIN" generate --from run/checkpoints --prompt The --temperature "$t"
done
expect_error "generate --top-k -3: k must be >= 0" \
  "$STRATA_BIN" generate --from run/checkpoints --prompt The --top-k -3
grep -q "^HINT: " out.txt || { cat out.txt; fail "no hint for --top-k"; }

# An HF directory whose config.json is absurd: 1e9 layers do not fit in memory; a
# fractional size is not a size.
hf_with() {  # hf_with DIR FIELD VALUE: a copy of the run's HF export with one field changed
  cp -rL run/checkpoints/hf-latest "$1"
  python3 - "$1/config.json" "$2" "$3" <<'PY'
import json, sys
path, field, value = sys.argv[1:]
config = json.load(open(path))
config[field] = json.loads(value)
json.dump(config, open(path, "w"))
PY
}
hf_with hf_layers num_hidden_layers 1e9
started=$SECONDS
expect_error "the model does not fit in memory" "$STRATA_BIN" eval --from hf_layers --data 'data/val_*.bin'
[ $((SECONDS - started)) -le 20 ] || fail "eval took $((SECONDS - started)) s to refuse 1e9 layers"
grep -q "num_hidden_layers=1000000000 (sizes from hf_layers/config.json)" out.txt ||
  { cat out.txt; fail "the memory message does not name num_hidden_layers"; }
expect_error "num_hidden_layers=1000000000" "$STRATA_BIN" generate --from hf_layers --prompt The
hf_with hf_vocab vocab_size 512.5
expect_error "hf_vocab/config.json: vocab_size is 512.5, not a whole number" \
  "$STRATA_BIN" eval --from hf_vocab --data 'data/val_*.bin'
echo "sizes and arguments: checked before allocating, with the key or option named"

# One job per run directory: while a job runs (held 12 s in its step-10 save), a second
# `strata train` on its run_dir fails at once, on every rank, naming the first one's host, pid
# and start time; the first finishes untouched and the same command then runs.
host=$(hostname)
STRATA_TEST_SLOW_SAVE=12@10 "$STRATA_FAULTS_BIN" train --config job.yaml --set job.run_dir=shared \
  --set checkpoint.interval=10 >first.txt 2>&1 &
first=$!
for _ in $(seq 600); do grep -qx "pid: $first" shared/.strata.lock 2>/dev/null && break; sleep 0.1; done
grep -qx "pid: $first" shared/.strata.lock || { kill -9 $first; cat first.txt; fail "the first job never recorded itself in shared/.strata.lock"; }
started=$SECONDS
expect_error "run directory shared is in use by another job: host $host, pid $first, started " \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=shared
[ $((SECONDS - started)) -le 10 ] || fail "the second job took $((SECONDS - started)) s to give up"
grep -q "^HINT: wait for that job to end (or stop it), or give this job another job.run_dir" out.txt ||
  { cat out.txt; fail "no hint when the run directory is in use"; }
expect_error "pid $first" mpirun --oversubscribe -np 2 "$STRATA_BIN" train --config job.yaml --set job.run_dir=shared
[ "$(grep -c "error: setting up job.run_dir failed on rank 0: run directory shared is in use by another job: host $host, pid $first" out.txt)" -eq 2 ] ||
  { cat out.txt; fail "not every rank reported the run directory in use"; }
kill -0 $first 2>/dev/null || { cat first.txt; fail "the first job ended before the checks were done"; }
wait $first || { cat first.txt; fail "the first job failed"; }
grep -q "step 20/20" first.txt || { cat first.txt; fail "the first job did not finish"; }
[ "$(grep -c '"loss"' shared/metrics.jsonl)" -eq 5 ] || fail "shared/metrics.jsonl: expected the first job's 5 step rows"
[ "$(cat shared/checkpoints/latest)" = step-0000020 ] || fail "the first job's final checkpoint is missing"
"$STRATA_BIN" inspect shared/checkpoints/step-0000010 --verify >/dev/null || fail "step 10 of the first job fails verification"
"$STRATA_BIN" inspect shared/checkpoints --verify >/dev/null || fail "step 20 of the first job fails verification"
[ -e shared/.strata.lock ] && [ ! -s shared/.strata.lock ] || fail "the lock file still names a holder after a clean exit"
"$STRATA_BIN" train --config job.yaml --set job.run_dir=shared >after.txt 2>&1 || { cat after.txt; fail "a run after the first one ended failed"; }
grep -q "nothing to train" after.txt || { cat after.txt; fail "the run after the first one did not find its step 20"; }
grep -q "run lock:" after.txt && { cat after.txt; fail "a cleanly released lock was reported as taken over"; }
echo "run lock: second job refused on every rank, first job intact, next run allowed"

# A job killed with SIGKILL leaves no stale lock: the next launch takes it over.
"$STRATA_BIN" train --config job.yaml --set job.run_dir=killed --set training.steps=100000 >killed.txt 2>&1 &
pid=$!
for _ in $(seq 600); do grep -qx "pid: $pid" killed/.strata.lock 2>/dev/null && break; sleep 0.1; done
grep -qx "pid: $pid" killed/.strata.lock || { kill -9 $pid; cat killed.txt; fail "the job never recorded itself in killed/.strata.lock"; }
kill -9 $pid; wait $pid 2>/dev/null || true
"$STRATA_BIN" train --config job.yaml --set job.run_dir=killed >relaunch.txt 2>&1 ||
  { cat relaunch.txt; fail "the launch after a kill -9 was refused"; }
grep -q "run lock: killed/.strata.lock named host $host, pid $pid, started .*taken over" relaunch.txt ||
  { cat relaunch.txt; fail "the relaunch did not report taking over the killed job's lock"; }
grep -qx "pid: $pid" killed/.strata.lock && fail "the killed job's record was not replaced"
echo "run lock: free again after kill -9"

echo "train_cli: all checks passed"
