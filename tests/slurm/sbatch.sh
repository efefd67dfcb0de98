#!/usr/bin/env bash
# The batch example scripts/slurm/train.sbatch on a private one-node cluster
# (tests/slurm/lib/cluster.sh), resized by sbatch's options to 1 node x 2 tasks:
#   - time limit: `scancel --signal=USR1 --batch` (what --signal=B:USR1@120 delivers) stops the
#     ranks with a full checkpoint at the next step boundary; the script requeues the job; the
#     requeued job resumes from the run's own latest checkpoint and completes, with the per-step
#     losses of an uninterrupted run, bit for bit; the job ends COMPLETED after one restart;
#   - cancel: `scancel JOB` (SIGTERM to every step and the batch shell) saves a checkpoint that
#     verifies, the job ends CANCELLED and is not requeued, and the same command run again
#     resumes from it and completes the uninterrupted curve.
# Exits 77 (skipped) where Slurm's daemons cannot run (not root, packages missing).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${STRATA_SOURCE_DIR:=$(cd "$here/../.." && pwd)}"
source "$here/../e2e/lib/common.sh"  # cd's into a fresh work dir
source "$here/lib/cluster.sh"
source "$here/lib/job.sh"
started=$(date +%s)

slurm_cluster_start
host=${SLURM_NODE_NAMES[0]}
steps=150
slurm_job_prepare $steps
export STRATA_BIN  # the script runs $STRATA_BIN (sbatch passes the environment on)

# The uninterrupted run, as the script starts it (threads_per_rank from --cpus-per-task=1).
srun --mpi=pmix -n 2 "$STRATA_BIN" train --config job.yaml --set job.run_dir=whole \
  --set parallel.threads_per_rank=1 >whole.log 2>&1 || { cat whole.log; slurm_fail "the uninterrupted run failed"; }

# submit RUN_DIR: submits the example on 1 node x 2 tasks; prints the job id.
submit() {
  sbatch --parsable -N1 -n2 --ntasks-per-node=2 --cpus-per-task=1 --time=10 \
    "$STRATA_SOURCE_DIR/scripts/slurm/train.sbatch" job.yaml --set job.run_dir="$1" ||
    slurm_fail "sbatch failed"
}
# wait_steps RUN_DIR JOB N: waits until the run has logged N steps (fails if the job ends first).
wait_steps() {
  for _ in $(seq 600); do
    [ -f "$1/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$1/metrics.jsonl")" -ge "$3" ] && return 0
    case $(slurm_job_field "$2" JobState) in
      PENDING | RUNNING | CONFIGURING) ;;
      *) cat "strata-$2.out" 2>/dev/null; scontrol show job "$2"; slurm_fail "job $2 ended before step $3" ;;
    esac
    sleep 0.1
  done
  slurm_fail "job $2 did not reach step $3 in 60 s"
}
# stop_step LOG SIGNALS: the step of the "stop: SIG... received; saving a full checkpoint at
# step S" line (the signal one of SIGNALS, a regex), exactly one such line.
stop_step() {
  local lines
  lines=$(grep -E "^stop: ($2) received; saving a full checkpoint at step [0-9]+$" "$1")
  if [ -z "$lines" ] || [ "$(wc -l <<<"$lines")" != 1 ]; then cat "$1"; fail "expected one stop line for $2 in $1"; fi
  sed 's/.* at step //' <<<"$lines"
}
# full_checkpoint DIR: a committed, full (not model-only) 2-rank checkpoint whose files verify.
full_checkpoint() {
  python3 - "$1" <<'PY' || fail "$1 is not a full 2-rank checkpoint"
import json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "metadata.json")))
assert m["world_size"] == 2 and not m["model_only"], (m["world_size"], m["model_only"])
assert sorted(m["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"], sorted(m["files"])
PY
  "$STRATA_BIN" inspect --verify "$1" >inspect.log 2>&1 || { cat inspect.log; fail "inspect --verify $1 failed"; }
  grep -q "^verify: all 2 file(s) match their size, SHA-256 and block checksums$" inspect.log ||
    { cat inspect.log; fail "inspect --verify $1 did not verify"; }
}

# --- Time limit: USR1 to the batch shell; the script requeues, the job resumes and completes.
job=$(submit requeue)
wait_steps requeue "$job" 3
scancel --signal=USR1 --batch "$job" || slurm_fail "scancel --signal=USR1 --batch $job failed"
slurm_wait_job "$job" 120 COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY
out="strata-$job.out"
[ "$(slurm_job_field "$job" JobState)" = COMPLETED ] || { cat "$out"; scontrol show job "$job"; fail "job $job did not complete"; }
[ "$(slurm_job_field "$job" ExitCode)" = 0:0 ] || { cat "$out"; fail "job $job exit code $(slurm_job_field "$job" ExitCode)"; }
[ "$(slurm_job_field "$job" Restarts)" = 1 ] || { cat "$out"; fail "job $job restarted $(slurm_job_field "$job" Restarts) time(s), expected 1"; }
stop=$(stop_step "$out" SIGUSR1)
[ "$stop" -ge 3 ] && [ "$stop" -lt $steps ] || fail "stopped at step $stop"
printf -v stop_dir 'requeue/checkpoints/step-%07d' "$stop"
grep -q "^checkpoint: committed $stop_dir (" "$out" || { cat "$out"; fail "no committed checkpoint at step $stop"; }
grep -qx "stop: checkpoint step $stop committed; relaunch the same command to resume" "$out" || { cat "$out"; fail "no stop report"; }
grep -qx "strata: stopped before the time limit with a checkpoint; requeueing job $job" "$out" ||
  { cat "$out"; fail "the script did not requeue job $job"; }
# Two launches in one output file (--open-mode=append): the first from scratch, the second
# (restart 1) from the stop checkpoint, continuing at the next step.
[ "$(grep -c '^launch: ' "$out")" = 2 ] || { cat "$out"; fail "expected two launches in $out"; }
[ "$(grep '^launch: ' "$out" | head -1)" = "launch: slurm job $job step 0 (srun, pmix), 2 task(s) on 1 node(s): $host" ] ||
  { grep '^launch: ' "$out"; fail "first launch report"; }
[ "$(grep '^launch: ' "$out" | tail -1)" = "launch: slurm job $job (restart 1) step 0 (srun, pmix), 2 task(s) on 1 node(s): $host" ] ||
  { grep '^launch: ' "$out"; fail "second launch report"; }
grep -q "^resume: none, training from scratch because no committed checkpoint in requeue/checkpoints" "$out" ||
  { cat "$out"; fail "the first launch did not start from scratch"; }
grep -q "^resume: loaded model, optimizer, lr_scheduler, dataloader, rng from $stop_dir (step $stop) because the run's own checkpoint folder requeue/checkpoints has committed checkpoints (latest); training continues at step $((stop + 1))$" "$out" ||
  { cat "$out"; fail "the requeued job did not resume from $stop_dir"; }
grep -q "^done: $((steps - stop)) steps (to step $steps) in " "$out" || { cat "$out"; fail "the requeued job did not complete"; }
! grep -q "^run lock: " "$out" || { cat "$out"; fail "the requeued job found a stale run lock"; }
full_checkpoint "$stop_dir"
losses_equal whole requeue
echo "time limit: job $job stopped at step $stop with a full checkpoint, requeued once, completed"

# --- Cancel: SIGTERM to every step (and the batch shell): a checkpoint, CANCELLED, no requeue.
job=$(submit cancel)
wait_steps cancel "$job" 3
scancel "$job" || slurm_fail "scancel $job failed"
slurm_wait_job "$job" 60 COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY
out="strata-$job.out"
[ "$(slurm_job_field "$job" JobState)" = CANCELLED ] || { cat "$out"; scontrol show job "$job"; fail "job $job is not CANCELLED"; }
[ "$(slurm_job_field "$job" Restarts)" = 0 ] || fail "the cancelled job $job was requeued"
# Slurm signals the ranks (SIGTERM) and the batch shell, which asks them with SIGUSR1: the first
# to arrive names the stop.
stop=$(stop_step "$out" "SIGTERM|SIGUSR1")
[ "$stop" -ge 3 ] && [ "$stop" -lt $steps ] || fail "stopped at step $stop"
printf -v stop_dir 'cancel/checkpoints/step-%07d' "$stop"
grep -q "^checkpoint: committed $stop_dir (" "$out" || { cat "$out"; fail "no committed checkpoint at step $stop"; }
! grep -q "requeueing" "$out" || { cat "$out"; fail "the script requeued a cancelled job"; }
# The folder's latest checkpoint is the stop checkpoint, whole; no step was logged after it.
[ "$(cat cancel/checkpoints/latest)" = "$(basename "$stop_dir")" ] ||
  fail "cancel/checkpoints/latest is '$(cat cancel/checkpoints/latest)', expected $(basename "$stop_dir")"
full_checkpoint "$stop_dir"
[ "$(grep -c '"loss"' cancel/metrics.jsonl)" = "$stop" ] || fail "cancel logged steps past $stop"
# The same command again resumes from it and completes the uninterrupted curve.
srun --mpi=pmix -n 2 "$STRATA_BIN" train --config job.yaml --set job.run_dir=cancel \
  --set parallel.threads_per_rank=1 >resume.log 2>&1 || { cat resume.log; slurm_fail "resuming the cancelled run failed"; }
grep -q "^resume: loaded model, optimizer, lr_scheduler, dataloader, rng from $stop_dir (step $stop)" resume.log ||
  { cat resume.log; fail "did not resume from $stop_dir"; }
! grep -q "^run lock: " resume.log || { cat resume.log; fail "the cancelled job left a stale run lock"; }
losses_equal whole cancel
echo "cancel: job $job saved a checkpoint at step $stop and ended CANCELLED; resumed and completed"
echo "slurm.sbatch: all checks passed in $(( $(date +%s) - started )) s"
