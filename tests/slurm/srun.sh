#!/usr/bin/env bash
# Strata launched by Slurm: a private one-node cluster (tests/slurm/lib/cluster.sh), ranks
# started by `srun --mpi=pmix`. Checks:
#   - srun -n 2 and -n 3 train with mpirun -np 2 / -np 3's per-step losses, bit for bit;
#   - the start-up report names Slurm's job and step, the PMIx plugin, the task count and
#     node list, and the layout MPI saw; under mpirun it says mpirun;
#   - a config error under srun: every rank reports it and srun fails.
# Exits 77 (skipped) where Slurm's daemons cannot run (not root, packages missing).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../e2e/lib/common.sh"  # cd's into a fresh work dir
source "$here/lib/cluster.sh"
source "$here/lib/job.sh"
started=$(date +%s)
command -v mpirun >/dev/null || fail "mpirun not found (scripts/setup.sh installs openmpi-bin)"

slurm_cluster_start
host=${SLURM_NODE_NAMES[0]}
slurm_job_prepare 8

# expect_line LOG PREFIX EXPECTED: the first line of LOG starting with PREFIX is EXPECTED.
expect_line() {
  local got
  got=$(grep -m1 "^$2" "$1") || { cat "$1"; fail "no '$2' line in $1"; }
  [ "$got" = "$3" ] || fail "start-up report in $1:
  got:      $got
  expected: $3"
}

job=0
for ranks in 2 3; do
  mpirun --oversubscribe -np "$ranks" "$STRATA_BIN" train --config job.yaml --set job.run_dir="mpirun$ranks" \
    >"mpirun$ranks.log" 2>&1 || { cat "mpirun$ranks.log"; fail "mpirun -np $ranks failed"; }
  srun --mpi=pmix -n "$ranks" "$STRATA_BIN" train --config job.yaml --set job.run_dir="srun$ranks" \
    >"srun$ranks.log" 2>&1 || { cat "srun$ranks.log"; slurm_fail "srun -n $ranks failed"; }
  job=$((job + 1))  # a fresh cluster numbers its jobs from 1
  expect_line "srun$ranks.log" "launch: " \
    "launch: slurm job $job step 0 (srun, pmix), $ranks task(s) on 1 node(s): $host"
  expect_line "srun$ranks.log" "world: " \
    "world: world $ranks rank(s) on 1 node(s) [$host]; rank 0 is local rank 0/$ranks on $host; ranks by node: $host = 0-$((ranks - 1)) (local 0-$((ranks - 1))); 1 intra-op thread(s) per rank"
  expect_line "mpirun$ranks.log" "launch: " "launch: mpirun, $ranks process(es)"
  losses_equal "mpirun$ranks" "srun$ranks"
done
# The 2- and 3-rank runs trained the same global batch: both curves are the 1-rank curve to
# rounding, and both end below where they began.
python3 - <<'PY'
import json
for name in ("srun2", "srun3"):
    loss = [r["loss"] for r in map(json.loads, open(name + "/metrics.jsonl")) if "loss" in r]
    assert len(loss) == 8 and loss[-1] < loss[0], (name, loss)
PY

# A config error: each rank reports it, srun fails.
expect_error "[rank 1] error: config error: unknown key model.dimm" \
  srun --mpi=pmix -n 2 "$STRATA_BIN" train --config job.yaml --set model.dimm=3
grep -qF "[rank 0] error: config error: unknown key model.dimm" out.txt || { cat out.txt; fail "rank 0 silent"; }
echo "slurm.srun: all checks passed in $(( $(date +%s) - started )) s"
