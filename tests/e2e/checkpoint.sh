#!/usr/bin/env bash
# End-to-end checkpointing through `strata train` and `strata inspect`: exact resume (bit-
# identical losses and final state) on 1 and 2 ranks, async == sync bytes, retention, resume
# precedence and its options, resharded resume, failure injection on one rank, kill -9 during
# a save, corruption, stop signals, and the errors a user can cause.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null

cat > job.yaml <<YAML
job: {name: ck, run_dir: run, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 20, global_batch_size: 12, micro_batch_size: 2, eval_interval: 10, eval_batches: 2, log_interval: 1}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 10, keep_latest_k: 0, last_save_model_only: false}
YAML

# losses RUN_DIR: "step loss" per logged step, full precision.
losses() { python3 -c "
import json, sys
for line in open('$1/metrics.jsonl'):
    r = json.loads(line)
    if 'loss' in r: print(r['step'], repr(r['loss']))"; }
# hashes STEP_DIR: every rank file's SHA-256 from metadata.json.
hashes() { python3 -c "
import json
m = json.load(open('$1/metadata.json'))
print(' '.join(f['sha256'] for _, f in sorted(m['files'].items())))"; }
meta() { python3 -c "import json; m = json.load(open('$1/metadata.json')); print($2)"; }

# --- Exact resume: 20 steps straight vs 10 + resume + 10 with the same command, N = 1 and 2.
for np in 1 2; do
  train "$np" straight$np
  mkdir -p resumed$np/checkpoints
  cp -r straight$np/checkpoints/step-0000010 resumed$np/checkpoints/
  train "$np" resumed$np
  grep -q "resume: loaded model, optimizer, lr_scheduler, dataloader, rng from resumed$np/checkpoints/step-0000010 (step 10) because the run's own checkpoint folder" resumed$np.log ||
    { cat resumed$np.log; fail "no resume line"; }
  [ "$(losses resumed$np | sed -n 1p | cut -d' ' -f1)" = 11 ] || fail "resumed run did not start at step 11"
  diff <(losses straight$np | tail -10) <(losses resumed$np) || fail "np=$np: resumed losses differ"
  [ "$(hashes straight$np/checkpoints/step-0000020)" = "$(hashes resumed$np/checkpoints/step-0000020)" ] ||
    fail "np=$np: final weights and optimizer state differ"
  [ "$(meta straight$np/checkpoints/step-0000020 "m['world_size']")" = "$np" ] || fail "world_size"
done
echo "exact resume: bit-identical on 1 and 2 ranks"

# --- Async writes the same bytes as sync (and commits every save).
train 2 async2 --set checkpoint.async_mode=async
for s in 10 20; do
  [ "$(hashes straight2/checkpoints/step-00000$s)" = "$(hashes async2/checkpoints/step-00000$s)" ] ||
    fail "async step $s differs from sync"
done
grep -q "foreground" async2.log || fail "async save did not report its foreground time"
echo "async: byte-identical to sync"

# --- Retention: keep_latest_k=2 over saves at 2,4,...,12 keeps exactly 2 committed dirs.
train 1 keep --set checkpoint.interval=2 --set checkpoint.keep_latest_k=2 --set training.steps=12
sleep 1  # the purge runs in the background after each commit
[ "$(ls -d keep/checkpoints/step-* | tr '\n' ' ')" = "keep/checkpoints/step-0000010 keep/checkpoints/step-0000012 " ] ||
  { ls keep/checkpoints; fail "retention kept the wrong set"; }
[ "$(cat keep/checkpoints/latest)" = step-0000012 ] || fail "latest is not step 12"
echo "retention: keeps exactly 2"

# --- A finished run relaunched: nothing to train, exit 0.
train 1 keep --set checkpoint.interval=2 --set checkpoint.keep_latest_k=2 --set training.steps=12
grep -q "nothing to train" keep.log || { cat keep.log; fail "relaunch of a finished run trained"; }

# --- Resume options: resume_path, resume_model_only, exclude_from_loading, load_step.
train 1 weights --set checkpoint.resume_path=straight1/checkpoints/step-0000010 --set checkpoint.resume_model_only=true
grep -q "resume: loaded model from straight1/checkpoints/step-0000010 (step 10) because checkpoint.resume_path with resume_model_only; weights only, training starts at step 1" weights.log ||
  { cat weights.log; fail "resume_model_only"; }
[ "$(losses weights | sed -n 1p | cut -d' ' -f1)" = 1 ] || fail "resume_model_only did not start at step 1"
train 1 noopt --set checkpoint.resume_path=straight1/checkpoints --set checkpoint.load_step=10 \
  --set 'checkpoint.exclude_from_loading=[optimizer, dataloader]'
grep -q "resume: loaded model, lr_scheduler, rng from straight1/checkpoints/step-0000010 (step 10)" noopt.log ||
  { cat noopt.log; fail "exclude_from_loading"; }
# The own folder wins over resume_path.
train 1 resumed1 --set checkpoint.resume_path=straight2/checkpoints --set training.steps=22
grep -q "from resumed1/checkpoints/step-0000020 (step 20) because the run's own" resumed1.log ||
  { cat resumed1.log; fail "own folder did not take precedence"; }
echo "resume options: ok"

# --- Resharded resume: saved on 1 rank, continued on 3; saved on 2, continued on 1.
train 3 reshard3 --set checkpoint.resume_path=straight1/checkpoints/step-0000010
grep -q "training continues at step 11" reshard3.log || { cat reshard3.log; fail "reshard 1->3"; }
train 1 reshard1 --set checkpoint.resume_path=straight2/checkpoints/step-0000010
paste <(losses straight2 | tail -10) <(losses reshard1) <(losses reshard3) | python3 -c "
import sys
for line in sys.stdin:
    s, a, s1, b, s3, c = line.split()
    assert s == s1 == s3, line
    for x in (b, c):  # other world sizes sum in another order: equal within 1e-5 relative
        assert abs(float(x) - float(a)) <= 1e-5 * abs(float(a)), line
"
echo "resharded resume: 1 -> 3 and 2 -> 1 continue the same curve"

# --- The final save: weights only, in export_dtype.
train 1 export --set checkpoint.last_save_model_only=true --set checkpoint.export_dtype=bfloat16 --set training.steps=4
[ "$(meta export/checkpoints/step-0000004 "m['model_only'], m['tensors']['norm.weight']['dtype'], any(k.startswith('optimizer.') for k in m['tensors'])")" = "True BF16 False" ] ||
  fail "last save is not model-only bf16"
echo "last save: model only, bf16"

# --- One rank's write fails: every rank exits non-zero with the same message, latest stays.
start=$(date +%s)
if STRATA_TEST_FAIL_SAVE=1@20 mpirun --oversubscribe -np 2 "$STRATA_FAULTS_BIN" train --config job.yaml \
  --set job.run_dir=failing >failing.log 2>&1; then cat failing.log; fail "failed save exited 0"; fi
[ $(( $(date +%s) - start )) -lt 120 ] || fail "failure took too long to surface"
for r in 0 1; do
  grep -q "\[rank $r\] error: checkpoint save at step 20 failed on rank 1: cannot write rank 1 file: injected failure" failing.log ||
    { cat failing.log; fail "rank $r did not report the failure"; }
done
[ "$(cat failing/checkpoints/latest)" = step-0000010 ] || fail "latest changed after a failed save"
[ ! -e failing/checkpoints/step-0000020 ] || fail "a failed save was committed"
[ ! -e failing/checkpoints/step-0000020.incomplete ] || fail "a failed save left its directory"
echo "failure injection: same error on both ranks, latest unchanged"

# --- kill -9 during a save: the relaunch resumes from the previous checkpoint.
STRATA_TEST_SLOW_SAVE=60@20 "$STRATA_FAULTS_BIN" train --config job.yaml --set job.run_dir=killed >killed.log 2>&1 &
pid=$!
for _ in $(seq 600); do [ -d killed/checkpoints/step-0000020.incomplete ] && break; sleep 0.1; done
[ -d killed/checkpoints/step-0000020.incomplete ] || { kill -9 $pid; cat killed.log; fail "save never started"; }
kill -9 $pid; wait $pid 2>/dev/null || true
train 1 killed
grep -q "from killed/checkpoints/step-0000010 (step 10)" killed.log || { cat killed.log; fail "no resume from step 10"; }
[ ! -e killed/checkpoints/step-0000020.incomplete ] || fail ".incomplete not cleaned by the next save"
[ "$(cat killed/checkpoints/latest)" = step-0000020 ] || fail "relaunch did not commit step 20"
echo "kill -9: resumed from the previous checkpoint"

# --- Corruption: inspect --verify and loading both name the file.
cp -r straight2/checkpoints/step-0000020 corrupt
"$STRATA_BIN" inspect corrupt --verify >inspect.txt || { cat inspect.txt; fail "inspect --verify of a good checkpoint"; }
grep -q "tok_embeddings.weight  F32 \[400, 32\]" inspect.txt || fail "inspect does not list tensors"
python3 -c "
p = 'corrupt/rank-00001.safetensors'; b = bytearray(open(p, 'rb').read()); b[-100] ^= 1; open(p, 'wb').write(b)"
expect_error "corrupt/rank-00001.safetensors: SHA-256" "$STRATA_BIN" inspect corrupt --verify
expect_error "checkpoint file corrupt/rank-00001.safetensors is corrupted" \
  mpirun --oversubscribe -np 2 "$STRATA_BIN" train --config job.yaml --set job.run_dir=c1 --set checkpoint.resume_path=corrupt
grep -c "corrupt/rank-00001.safetensors is corrupted" out.txt | grep -q 2 || { cat out.txt; fail "not every rank reported"; }
rm corrupt/rank-00001.safetensors
expect_error "corrupt/rank-00001.safetensors is missing" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=c2 --set checkpoint.resume_path=corrupt
echo '{"format": "strata-checkpoint"' >corrupt/metadata.json
expect_error "corrupt/metadata.json is not a valid Strata checkpoint description: invalid JSON" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=c3 --set checkpoint.resume_path=corrupt
echo "corruption: named on every path"

# --- User errors: missing path, folder without checkpoints, another model shape, missing step.
expect_error "checkpoint path nowhere does not exist" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=e1 --set checkpoint.resume_path=nowhere
mkdir empty
expect_error "checkpoint.resume_path empty holds no committed Strata checkpoint" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=e2 --set checkpoint.resume_path=empty
expect_error "'layers.0.attention.wq.weight' has shape [32, 32] in the checkpoint but [64, 64] in the model" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=e3 --set model.dim=64 \
  --set checkpoint.resume_path=straight1/checkpoints
expect_error "has no committed checkpoint for step 7 (committed steps: 10, 20)" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=e4 --set checkpoint.resume_path=straight1/checkpoints \
  --set checkpoint.load_step=7
expect_error "checkpoint.hf_max_shard_size = '5XB' is not a size" \
  "$STRATA_BIN" train --config job.yaml --set checkpoint.hf_max_shard_size=5XB
echo "user errors: ok"

# --- Stop signals: SIGUSR1 to one rank of two, SIGTERM to a single process. All ranks agree,
# save a full checkpoint, exit 0; the same command resumes.
signal_run() {  # NP SIGNAL DIR [--set ...]
  local np=$1 sig=$2 dir=$3
  shift 3
  mpirun --oversubscribe -np "$np" "$STRATA_BIN" train --config job.yaml --set job.run_dir="$dir" \
    --set training.steps=100000 --set training.eval_interval=0 "$@" >"$dir.log" 2>&1 &
  local launcher=$!
  for _ in $(seq 600); do
    [ -f "$dir/metrics.jsonl" ] && [ "$(grep -c loss "$dir/metrics.jsonl")" -ge 3 ] && break; sleep 0.1
  done
  local target
  target=$(pgrep -P "$launcher" -f "job.run_dir=$dir" | tail -1)
  [ -n "$target" ] || { kill $launcher; fail "no rank process found"; }
  kill -s "$sig" "$target"
  wait $launcher || { cat "$dir.log"; fail "$sig: exit code not 0"; }
  grep -q "stop: .* saving a full checkpoint at step" "$dir.log" || { cat "$dir.log"; fail "$sig: no stop line"; }
  local step
  step=$(sed 's/step-0*//' "$dir/checkpoints/latest")
  [ "$(meta "$dir/checkpoints/step-$(printf %07d "$step")" "m['model_only']")" = False ] ||
    fail "$sig: stop checkpoint is not a full one"
  train "$np" "$dir" --set training.steps=$((step + 2)) --set training.eval_interval=0 "$@"
  grep -q "training continues at step $((step + 1))" "$dir.log" || { cat "$dir.log"; fail "$sig: no resume"; }
}
signal_run 2 USR1 sig2
signal_run 1 TERM sig1
signal_run 4 USR1 sig_hsdp --set parallel.fsdp.shard_group_size=2 --set training.micro_batch_size=1
echo "signals: SIGUSR1 and SIGTERM save, exit 0 and resume (FSDP, HSDP 2x2, one process)"

echo "checkpoint: all checks passed"
