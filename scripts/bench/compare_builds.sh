#!/usr/bin/env bash
# Two builds of strata on the same job, alternating run by run (the machine is noisy): the
# median tokens/s of each over RUNS runs and their ratio, and whether both wrote the same
# per-step losses. For checking that a change to the code keeps the training speed.
#   scripts/bench/compare_builds.sh BASELINE_STRATA CANDIDATE_STRATA [CONFIG] [STEPS] [RANKS]
#   (defaults: configs/tiny.yaml, 50 steps, 2 ranks; RUNS=3 in the environment)
# Needs data/tiny (scripts/demo.sh prepares it) or a config whose data exists. The metric is
# the run's own tokens/s over its training steps (evaluation and saving excluded).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
if [ $# -lt 2 ]; then
  echo "usage: $0 BASELINE_STRATA CANDIDATE_STRATA [CONFIG] [STEPS] [RANKS]" >&2
  exit 2
fi
baseline=$1 candidate=$2 config=${3:-configs/tiny.yaml} steps=${4:-50} ranks=${5:-2}
runs=${RUNS:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
bind=core  # one rank per core; a single rank keeps every core for its threads
[ "$ranks" -eq 1 ] && bind=none
for i in $(seq "$runs"); do
  for side in baseline candidate; do
    bin=$baseline
    [ "$side" = candidate ] && bin=$candidate
    mpirun --bind-to "$bind" -np "$ranks" "$bin" train --config "$config" --set training.steps="$steps" \
      --set training.log_interval=1 --set checkpoint.enable=false --set job.run_dir="$out/$side-$i" \
      >"$out/$side-$i.log" 2>&1 || { cat "$out/$side-$i.log"; exit 1; }
  done
done
python3 - "$out" "$runs" <<'PY'
import json, re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def speed(log):
    return float(re.search(r"done: .* ([0-9.]+) tokens/s", open(log).read()).group(1))
def losses(run):
    return [r["loss"] for r in map(json.loads, open(f"{out}/{run}/metrics.jsonl")) if "loss" in r]
med = {s: statistics.median(speed(f"{out}/{s}-{i}.log") for i in range(1, runs + 1)) for s in ("baseline", "candidate")}
same = all(losses(f"baseline-{i}") == losses(f"candidate-{i}") for i in range(1, runs + 1))
print(f"baseline  {med['baseline']:.0f} tokens/s (median of {runs})")
print(f"candidate {med['candidate']:.0f} tokens/s (median of {runs})")
print(f"ratio candidate/baseline {med['candidate'] / med['baseline']:.3f}; per-step losses "
      f"{'identical' if same else 'DIFFER'}")
PY
