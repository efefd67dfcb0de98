#!/usr/bin/env bash
# srun across nodes without a cluster: two fake nodes n1 and n2 (network namespaces on a
# bridge, own hostnames; tests/multinode/lib/netns_nodes.sh), each running its own slurmd of a
# private Slurm cluster (tests/slurm/lib/cluster.sh) whose slurmctld listens on the bridge.
# `srun --mpi=pmix -N 2 --ntasks-per-node=2` trains on 2 nodes x 2 ranks; checks:
#   - the start-up report names the Slurm job and step, both nodes, and the layout MPI saw;
#   - the per-step losses are the single-process curve (1e-5 relative, as data_parallel.sh),
#     and mpirun's on the same nodes and layout bit for bit.
# Exits 77 (skipped) where network namespaces or Slurm's daemons are not available.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${STRATA_SOURCE_DIR:=$(cd "$here/../.." && pwd)}"
source "$here/../e2e/lib/common.sh"  # cd's into a fresh work dir
source "$here/../multinode/lib/netns_nodes.sh"
source "$here/lib/cluster.sh"
source "$here/lib/job.sh"
started=$(date +%s)

slurm_check_prerequisites  # skip before building the network when Slurm cannot run at all
netns_setup n1 n2
SLURM_CTLD_ADDR="$NETNS_SUBNET.1" slurm_setup "n1=$(node_ip n1)" "n2=$(node_ip n2)"
for node in n1 n2; do
  # slurmd in the node's network namespace, with the node's hostname (as netns_agent.sh does)
  # and a node-local job temp dir (TmpFS; the pmix plugin's per-step directories are named by
  # job and step only, so nodes sharing one would collide). nsenter, not `ip netns exec`: that
  # one mounts a fresh /sys without /sys/fs/cgroup, and slurmd 22.05 initialises its cgroup
  # plugin even with proctrack/linuxproc and task/none.
  mkdir -p "$SLURM_DIR/tmp-$node"
  # shellcheck disable=SC2016  # expanded by the inner shell
  slurm_start_node "$node" nsenter --net="/run/netns/$NETNS_PREFIX-$node" unshare --uts --mount \
    bash -c 'hostname "$0" && mount --bind "$1" "$2" && shift 2 && exec "$@"' \
    "$node" "$SLURM_DIR/tmp-$node" "$SLURM_DIR/tmp"
done
slurm_wait_idle
echo "slurm: $(sinfo --version) cluster up: nodes ${SLURM_NODE_NAMES[*]} on $NETNS_SUBNET.0/24"
slurm_job_prepare 8

"$STRATA_BIN" train --config job.yaml --set job.run_dir=one >one.log 2>&1 || { cat one.log; fail "1-process run failed"; }
before=$(( $(link_bytes n1) + $(link_bytes n2) ))
timeout 300 srun --mpi=pmix -N 2 --ntasks-per-node=2 "$STRATA_BIN" train --config job.yaml \
  --set job.run_dir=run4 >run4.log 2>&1 || { cat run4.log; slurm_fail "srun -N 2 --ntasks-per-node=2 failed"; }
traffic=$(( $(link_bytes n1) + $(link_bytes n2) - before ))

expect_line() {  # LOG PREFIX EXPECTED
  local got
  got=$(grep -m1 "^$2" "$1") || { cat "$1"; fail "no '$2' line in $1"; }
  [ "$got" = "$3" ] || fail "start-up report in $1:
  got:      $got
  expected: $3"
}
expect_line run4.log "launch: " "launch: slurm job 1 step 0 (srun, pmix), 4 task(s) on 2 node(s): n[1-2]"
expect_line run4.log "world: " "world: world 4 rank(s) on 2 node(s) [n1, n2]; rank 0 is local rank 0/2 on n1; ranks by node: n1 = 0-1 (local 0-1), n2 = 2-3 (local 0-1); 1 intra-op thread(s) per rank"
# Each step all-gathers and reduce-scatters every unit across the nodes: well over 1 MB in all.
[ "$traffic" -gt 1000000 ] || fail "only $traffic bytes crossed the veth links"
python3 - one run4 <<'PY'
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in r}
ref, got = losses(sys.argv[1]), losses(sys.argv[2])
assert sorted(got) == sorted(ref) == list(range(1, 9)), (sorted(got), sorted(ref))
for s in ref:
    assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])
print("run4: steps 1-8 match the 1-process run (max rel diff %.1e)" %
      max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref))
PY
# mpirun on the same fake nodes and layout gives the same losses, bit for bit.
node_mpirun --host n1:2,n2:2 -np 4 "$STRATA_BIN" train --config job.yaml --set job.run_dir=mpirun4 \
  >mpirun4.log 2>&1 || { cat mpirun4.log; fail "mpirun 2x2 failed"; }
expect_line mpirun4.log "world: " "$(grep -m1 '^world: ' run4.log)"
losses_equal mpirun4 run4
echo "2x2 under srun: $traffic bytes between the nodes"
echo "slurm.multinode: all checks passed in $(( $(date +%s) - started )) s"
