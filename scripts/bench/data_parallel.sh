#!/usr/bin/env bash
# Data-parallel benchmark on one machine, all runs in this invocation: the same global batch
# trained by 1 rank x 2 threads, and by 2 ranks x 1 thread with FSDP (recomputing units in
# backward, and keeping activations), and with replicated data parallel. Prints a Markdown table: step time, tokens/s, share of step time inside
# collectives, and MB moved per step per rank next to the ring-algorithm theory.
#   scripts/bench/data_parallel.sh [CONFIG] [STEPS]     (default: configs/tiny.yaml, 60)
# Needs data/tiny (scripts/demo.sh prepares it) or a config whose data exists.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
config=${1:-configs/tiny.yaml}
steps=${2:-60}
strata="${STRATA_BUILD_DIR:-$root/build}/strata"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

common=(--set training.steps="$steps" --set training.log_interval=1 --set training.eval_interval=0)
run() {  # NAME RANKS THREADS [--set ...]
  local name=$1 ranks=$2 threads=$3; shift 3
  mpirun --bind-to none -np "$ranks" "$strata" train --config "$config" "${common[@]}" \
    --set job.run_dir="$out/$name" --set parallel.threads_per_rank="$threads" "$@" \
    >"$out/$name.log" 2>&1 || { cat "$out/$name.log"; exit 1; }
}
run single 1 2
run fsdp 2 1 --set parallel.fsdp.enabled=true --set parallel.fsdp.activation_checkpointing=full
run fsdp_keep 2 1 --set parallel.fsdp.enabled=true --set parallel.fsdp.activation_checkpointing=none
run replicated 2 1 --set parallel.fsdp.enabled=false

python3 - "$out" "$steps" "$(nproc)" <<'PY'
import json, re, statistics, sys
out, steps, cores = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(f"{out}/single.log").read()
params = float(re.search(r"llama, ([0-9.]+)M parameters", log).group(1)) * 1e6
def rows(name):
    r = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    return [x for x in r if "loss" in x and x["step"] > 5]  # skip warm-up steps
print(f"| run | ranks x threads | step ms (median) | tokens/s | comm share | MB/step/rank | theory MB |")
print("| --- | --- | --- | --- | --- | --- | --- |")
base = None
for name, layout, theory in (("single", "1 x 2", 0.0),
                             ("fsdp", "2 x 1", 3 * params * 4 * 0.5 / 1e6),
                             ("fsdp_keep", "2 x 1", 2 * params * 4 * 0.5 / 1e6),
                             ("replicated", "2 x 1", 2 * params * 4 * 0.5 / 1e6)):
    r = rows(name)
    ms = statistics.median(x["step_ms"] for x in r)
    tps = statistics.median(x["tokens_per_s"] for x in r)
    comm = statistics.median(x.get("comm_fraction", 0.0) for x in r)
    mb = statistics.median(x.get("comm_mb", 0.0) for x in r)
    base = base or ms
    print(f"| {name} | {layout} | {ms:.0f} ({ms / base:.2f}x) | {tps:.0f} | {comm:.1%} | {mb:.1f} | {theory:.1f} |")
f, k, d = (statistics.median(x["step_ms"] for x in rows(n)) for n in ("fsdp", "fsdp_keep", "replicated"))
print(f"\nStep time over replicated DP: FSDP with recompute {f / d - 1:+.1%}, FSDP keeping "
      f"activations {k / d - 1:+.1%} ({cores} cores, {steps} steps, {params / 1e6:.2f}M "
      f"parameters, medians over steps 6..{steps})")
PY
