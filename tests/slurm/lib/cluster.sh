# shellcheck shell=bash disable=SC2154  # $work and fail() come from tests/e2e/lib/common.sh
# A private Slurm cluster for one test (sourced by tests/slurm/*.sh, after
# tests/e2e/lib/common.sh): its own munged (key, socket, seed, log), slurmctld and slurmd(s),
# configured by a slurm.conf in the work dir (exported as SLURM_CONF, so the client commands
# srun/sbatch/scontrol/scancel/sinfo use it), with state and spool dirs under the work dir and
# free TCP ports. Nothing under /etc/slurm or /etc/munge is read or written, and the daemons are
# stopped by the PIDs recorded at start (an EXIT trap).
#
#   slurm_setup NODE_SPEC...   write the config and start munged and slurmctld (at
#                              SLURM_CTLD_ADDR, default 127.0.0.1). NODE_SPEC is NAME or
#                              NAME=ADDR (default: this host's short name at 127.0.0.1);
#                              exits 77 (skip) with the reason where the daemons cannot run here
#   slurm_start_node NAME [WRAPPER...]
#                              start slurmd for node NAME (prefixed by WRAPPER, e.g. a command
#                              entering a network namespace)
#   slurm_wait_idle            wait until every node is idle (fails with the daemons' logs)
#   slurm_cluster_start        slurm_setup + slurm_start_node + slurm_wait_idle for one node
#   slurm_job_field JOB KEY    a field of `scontrol show job` (JobState, ExitCode, Restarts, ...)
#   slurm_wait_job JOB STATE.. wait until the job's state is one of STATEs (fails on timeout)
#   slurm_teardown             stop the daemons (installed as the EXIT trap by slurm_setup)
#
# Slurm runs without cgroups (containers rarely delegate them): proctrack/linuxproc, task/none,
# no job accounting. Each node declares SLURM_NODE_CPUS CPUs (default 4) whatever the hardware
# has (SlurmdParameters=config_overrides), so small machines still take 3-task steps.
# STRATA_SLURM_TEST_DENY=1 pretends the daemons cannot run (to check the skip path).

SLURM_DIR=""              # config, state, spool and logs
SLURM_NODE_NAMES=()       # node names, in slurm.conf order
SLURM_DAEMON_PIDS=()      # munged, slurmctld, slurmd(s): stopped in reverse order
SLURM_DAEMON_NAMES=()
: "${SLURM_NODE_CPUS:=4}"
: "${SLURM_CTLD_ADDR:=127.0.0.1}"  # where slurmd and the clients reach slurmctld

skip() { echo "SKIP: $*" >&2; exit 77; }

# A TCP port nothing listens on now (the kernel's choice for an ephemeral bind).
slurm_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# Records a daemon started in the background ($!) under NAME.
slurm_record() { SLURM_DAEMON_PIDS+=("$2"); SLURM_DAEMON_NAMES+=("$1"); }

slurm_teardown() {
  local i pid
  for ((i = ${#SLURM_DAEMON_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${SLURM_DAEMON_PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm: ${SLURM_DAEMON_NAMES[i]} (pid $pid) did not stop on SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  SLURM_DAEMON_PIDS=()
  SLURM_DAEMON_NAMES=()
}

# Prints the daemons' logs (on failure).
slurm_logs() {
  local f
  for f in "$SLURM_DIR"/log/*.log; do
    [ -f "$f" ] || continue
    echo "--- $f (last 40 lines)" >&2
    tail -n 40 "$f" >&2
  done
}

slurm_fail() { slurm_logs; fail "$@"; }

slurm_check_prerequisites() {
  [ "${STRATA_SLURM_TEST_DENY:-0}" = 1 ] &&
    skip "Slurm's daemons cannot run here (simulated by STRATA_SLURM_TEST_DENY=1)"
  [ "$(uname -s)" = Linux ] || skip "the Slurm tests need Linux"
  [ "$(id -u)" -eq 0 ] || skip "the Slurm tests run slurmd as root (it starts jobs as their user); run as root"
  local cmd
  for cmd in munged slurmctld slurmd srun sbatch scontrol scancel sinfo; do
    command -v "$cmd" >/dev/null ||
      skip "'$cmd' is not installed (scripts/setup.sh installs slurm-wlm and munge)"
  done
  command -v python3 >/dev/null || fail "python3 not found"
}

slurm_setup() {
  slurm_check_prerequisites
  # Replaces common.sh's trap: stop the daemons, then remove the work dir.
  # (After the fake nodes' teardown when tests/multinode/lib/netns_nodes.sh set them up.)
  if declare -F netns_teardown >/dev/null; then
    trap 'slurm_teardown; netns_teardown; cd /; rm -rf "$work"' EXIT
  else
    trap 'slurm_teardown; cd /; rm -rf "$work"' EXIT
  fi
  trap 'exit 130' INT
  trap 'exit 143' TERM

  SLURM_DIR="$work/slurm"
  mkdir -p "$SLURM_DIR"/{munge,state,log,spool,tmp}
  chmod 700 "$SLURM_DIR/munge"
  local host addr spec ctld_port node_port nodes=""
  host=$(hostname -s)
  [ $# -gt 0 ] || set -- "$host"
  for spec in "$@"; do
    local name=${spec%%=*}
    addr=127.0.0.1
    [[ $spec == *=* ]] && addr=${spec#*=}
    SLURM_NODE_NAMES+=("$name")
    mkdir -p "$SLURM_DIR/spool/$name"
    nodes+="NodeName=$name NodeAddr=$addr NodeHostname=$name CPUs=$SLURM_NODE_CPUS Boards=1"
    nodes+=" SocketsPerBoard=1 CoresPerSocket=$SLURM_NODE_CPUS ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN"$'\n'
  done

  # munged: a fresh key, its own socket. It refuses a key or directory others can write to.
  dd if=/dev/urandom of="$SLURM_DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$SLURM_DIR/munge/munge.key"
  SLURM_MUNGE_SOCKET="$SLURM_DIR/munge/munge.socket"
  munged --foreground --force --socket="$SLURM_MUNGE_SOCKET" --key-file="$SLURM_DIR/munge/munge.key" \
    --pid-file="$SLURM_DIR/munge/munged.pid" --log-file="$SLURM_DIR/log/munged.log" \
    --seed-file="$SLURM_DIR/munge/munged.seed" >/dev/null 2>&1 &
  slurm_record munged $!
  for _ in $(seq 100); do [ -S "$SLURM_MUNGE_SOCKET" ] && break; sleep 0.1; done
  [ -S "$SLURM_MUNGE_SOCKET" ] || slurm_fail "munged did not create its socket $SLURM_MUNGE_SOCKET"

  ctld_port=$(slurm_free_port)
  node_port=$(slurm_free_port)
  [ "$ctld_port" != "$node_port" ] || node_port=$(slurm_free_port)
  export SLURM_CONF="$SLURM_DIR/slurm.conf"
  cat > "$SLURM_CONF" <<CONF
# Generated by tests/slurm/lib/cluster.sh for one test.
ClusterName=strata-test
SlurmctldHost=$host($SLURM_CTLD_ADDR)
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$SLURM_MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/%n
# Job temp space, also where the pmix plugin puts its per-step directories (named by job and
# step id only: clusters side by side would share /tmp/spmix_appdir_0_1.0).
TmpFS=$SLURM_DIR/tmp
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/spool/%n/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_DIR/log/jobcomp.txt
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
# Look at pending jobs every second (default 60 s): a requeued job restarts promptly.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
$nodes
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

  local mpi_list
  mpi_list=$(srun --mpi=list 2>&1)
  grep -q 'pmix' <<<"$mpi_list" ||
    skip "Slurm has no pmix MPI plugin here (srun --mpi=list said: $(tr '\n' ' ' <<<"$mpi_list"))"

  slurmctld -D -i -f "$SLURM_CONF" >"$SLURM_DIR/log/slurmctld.out" 2>&1 &
  slurm_record slurmctld $!
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  scontrol ping >/dev/null 2>&1 || {
    cat "$SLURM_DIR/log/slurmctld.out" >&2
    slurm_fail "slurmctld did not answer 'scontrol ping': $(scontrol ping 2>&1)"
  }
}

slurm_start_node() {
  local name=$1
  shift
  "$@" slurmd -D -N "$name" -f "$SLURM_CONF" >"$SLURM_DIR/log/slurmd-$name.out" 2>&1 &
  slurm_record "slurmd $name" $!
}

slurm_wait_idle() {
  local states=""
  for _ in $(seq 200); do
    # One line per node: "NAME STATE"; all idle (not idle*, down, drain...).
    states=$(sinfo -h -N -o '%N %t' 2>&1 | sort -u)
    if [ "$(grep -c ' idle$' <<<"$states")" = "${#SLURM_NODE_NAMES[@]}" ] &&
       [ "$(wc -l <<<"$states")" = "${#SLURM_NODE_NAMES[@]}" ]; then
      return 0
    fi
    sleep 0.1
  done
  cat "$SLURM_DIR"/log/slurmd-*.out >&2 2>/dev/null
  slurm_fail "the Slurm node(s) did not become idle: sinfo says: $(tr '\n' ';' <<<"$states")"
}

slurm_cluster_start() {
  slurm_setup
  slurm_start_node "${SLURM_NODE_NAMES[0]}"
  slurm_wait_idle
  echo "slurm: $(sinfo --version) cluster up: node ${SLURM_NODE_NAMES[*]}, SLURM_CONF=$SLURM_CONF"
}

slurm_job_field() {
  scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}

slurm_wait_job() {  # JOB TIMEOUT_S STATE...
  local job=$1 timeout=$2 state=""
  shift 2
  local deadline=$(( $(date +%s) + timeout ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    state=$(slurm_job_field "$job" JobState)
    for s in "$@"; do [ "$state" = "$s" ] && return 0; done
    sleep 0.2
  done
  scontrol show job "$job" >&2
  slurm_fail "job $job is $state after ${timeout}s, expected $*"
}
