# shellcheck shell=bash disable=SC2154  # $work and fail() come from tests/e2e/lib/common.sh
# Fake nodes for multi-node tests without a cluster (sourced by tests/multinode/*.sh, after
# tests/e2e/lib/common.sh). Each node is a network namespace with one veth link to a bridge on
# a private /24; this (root) namespace holds the bridge's .1 address, where mpirun listens.
# Processes start on a node through netns_agent.sh (an ssh stand-in for mpirun) with the node's
# own hostname, so Open MPI sees separate hosts: MPI_COMM_TYPE_SHARED groups the ranks of one
# node, and ranks of different nodes talk TCP over the veth links. The filesystem is shared by
# all nodes (a shared checkpoint folder), except where STRATA_NETNS_PRIVATE gives each node a
# private directory.
#
#   netns_setup N1 N2 ...     create the bridge, the nodes (namespaces) and a "hub" namespace;
#                             exits 77 (skip) with the reason when this machine does not allow it
#   node_mpirun ARGS...       mpirun over the fake nodes (pass --host n1:2,n2:2 -np 4 etc.)
#   node_ip NODE              a node's address; HUB_IP / CDN_IP: the hub namespace's two
#   in_node NODE CMD...       run a command in a node's namespace (hostname not set)
#   netns_teardown            kill what runs in the namespaces, delete them and every link made
#                             here (installed as an EXIT trap by netns_setup)
#
# Names carry this shell's PID (namespaces strata-mn<PID>-<node>, links smb<PID>, smh<PID>...),
# so concurrent runs do not collide, and teardown deletes only what this run created.
# STRATA_NETNS_TEST_DENY=1 pretends `ip netns add` is refused (to check the skip path).

NETNS_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # source this file by absolute path
NETNS_ID=$$
NETNS_PREFIX="strata-mn$NETNS_ID"
NETNS_BRIDGE="smb$NETNS_ID"
NETNS_CREATED_NS=()    # namespaces this run created
NETNS_CREATED_LINKS=() # links this run created in the root namespace
NETNS_NODES=""         # "host=namespace ..." for the agent
declare -A NETNS_NODE_IP=()
declare -A NETNS_NODE_LINK=()  # bridge side of each node's veth link
NETNS_SUBNET=""
NETNS_AGENT=""
HUB_NS=""
HUB_IP=""
CDN_IP=""

skip() { echo "SKIP: $*" >&2; exit 77; }

netns_teardown() {
  local ns pid link
  for ns in "${NETNS_CREATED_NS[@]}"; do
    # Everything still running in our namespaces (daemonised orteds, ranks, the fake Hub) was
    # started by this test.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  for ns in "${NETNS_CREATED_NS[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
      sleep 0.2
    done
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns delete "$ns" 2>/dev/null || true
  done
  for link in "${NETNS_CREATED_LINKS[@]}"; do
    if ip link show "$link" >/dev/null 2>&1; then ip link delete "$link" 2>/dev/null || true; fi
  done
  NETNS_CREATED_NS=()
  NETNS_CREATED_LINKS=()
}

# A /24 in 10.213.0.0/16 that no address or route here uses yet.
netns_pick_subnet() {
  local i octet addrs routes
  addrs=$(ip -4 addr show 2>/dev/null || true)
  for i in $(seq 0 49); do
    octet=$(( (NETNS_ID + i) % 200 + 20 ))
    routes=$(ip -4 route show to match "10.213.$octet.1" 2>/dev/null || true)
    if ! grep -q "inet 10\.213\.$octet\." <<<"$addrs" && ! grep -qE '^[0-9]' <<<"$routes"; then
      echo "10.213.$octet"
      return 0
    fi
  done
  return 1
}

# netns_add_ns NAME: create a namespace. The first one probes: when this machine refuses it,
# the test is skipped; a later failure is an error.
netns_add_ns() {
  local err
  if [ "${STRATA_NETNS_TEST_DENY:-0}" = 1 ]; then
    err="mount --make-shared /run/netns failed: Operation not permitted (simulated by STRATA_NETNS_TEST_DENY=1)"
  elif err=$(ip netns add "$1" 2>&1); then
    NETNS_CREATED_NS+=("$1")
    return 0
  fi
  [ ${#NETNS_CREATED_NS[@]} -gt 0 ] && fail "ip netns add $1: $err"
  skip "network namespaces are not permitted here ('ip netns add' said: $err); the multi-node" \
    "tests need root with CAP_SYS_ADMIN and CAP_NET_ADMIN (e.g. a privileged container)"
}

# netns_add_node NS IFNAME ADDR...: a namespace (created unless it exists) with a veth to the
# bridge, named eth0 inside, holding ADDR(s)/24.
netns_add_node() {
  local ns=$1 host_side=$2 err addr
  shift 2
  [[ " ${NETNS_CREATED_NS[*]} " == *" $ns "* ]] || netns_add_ns "$ns"
  err=$(ip link add "$host_side" type veth peer name "${host_side}p" 2>&1) ||
    skip "cannot create veth links here ('ip link add ... type veth' said: $err)"
  NETNS_CREATED_LINKS+=("$host_side")
  ip link set "$host_side" master "$NETNS_BRIDGE"
  ip link set "$host_side" up
  ip link set "${host_side}p" netns "$ns"
  ip -n "$ns" link set "${host_side}p" name eth0
  for addr in "$@"; do ip -n "$ns" addr add "$addr/24" dev eth0; done
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
}

netns_setup() {
  local err i=10 host
  [ "$(uname -s)" = Linux ] || skip "network namespaces need Linux"
  command -v ip >/dev/null || skip "'ip' (iproute2) is not installed"
  command -v unshare >/dev/null || skip "'unshare' (util-linux) is not installed"
  command -v mpirun >/dev/null || fail "mpirun not found (scripts/setup.sh installs openmpi-bin)"
  # Replaces common.sh's trap: tear the network down, then remove the work dir.
  trap 'netns_teardown; cd /; rm -rf "$work"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  # The first namespace tells whether this machine allows any of it.
  HUB_NS="$NETNS_PREFIX-hub"
  netns_add_ns "$HUB_NS"
  err=$(ip netns exec "$HUB_NS" unshare --uts --mount true 2>&1) ||
    skip "cannot enter a network namespace with private UTS and mount namespaces here: $err"
  NETNS_SUBNET=$(netns_pick_subnet) || fail "no free /24 in 10.213.0.0/16 for the test network"
  err=$(ip link add "$NETNS_BRIDGE" type bridge 2>&1) ||
    skip "cannot create a bridge here ('ip link add ... type bridge' said: $err)"
  NETNS_CREATED_LINKS+=("$NETNS_BRIDGE")
  ip addr add "$NETNS_SUBNET.1/24" dev "$NETNS_BRIDGE"
  ip link set "$NETNS_BRIDGE" up

  # The Hub "machine": .2 for the API, .254 for its CDN (another host for the token rules).
  HUB_IP="$NETNS_SUBNET.2"
  CDN_IP="$NETNS_SUBNET.254"
  netns_add_node "$HUB_NS" "smh${NETNS_ID}hb" "$HUB_IP" "$CDN_IP"
  for host in "$@"; do
    i=$((i + 1))
    [[ $host =~ ^[a-z][a-z0-9-]*$ ]] || fail "bad node name '$host'"
    NETNS_NODE_LINK[$host]="smh${NETNS_ID}x$i"  # link names have at most 15 characters
    netns_add_node "$NETNS_PREFIX-$host" "${NETNS_NODE_LINK[$host]}" "$NETNS_SUBNET.$i"
    NETNS_NODES+="${NETNS_NODES:+ }$host=$NETNS_PREFIX-$host"
    NETNS_NODE_IP[$host]="$NETNS_SUBNET.$i"
  done
  export STRATA_NETNS_NODES="$NETNS_NODES"

  # mpirun execs the agent: a copy in the work dir (no spaces, executable whatever the checkout).
  NETNS_AGENT="$PWD/netns_agent.sh"
  cp "$NETNS_LIB_DIR/../netns_agent.sh" "$NETNS_AGENT"
  chmod +x "$NETNS_AGENT"
  echo "netns: nodes [$NETNS_NODES] on $NETNS_SUBNET.0/24 (bridge $NETNS_BRIDGE at .1, hub .2/.254)"
}

node_ip() { echo "${NETNS_NODE_IP[$1]}"; }
in_node() { local node=$1; shift; ip netns exec "$NETNS_PREFIX-$node" "$@"; }

# mpirun with the fake nodes: the agent enters each node's namespace; Open MPI's daemons and
# ranks talk only over the test subnet (TCP between nodes, shared memory within one);
# every daemon is started from here (no tree spawn: the nodes have no agent of their own).
node_mpirun() {
  timeout --foreground 300 mpirun --mca plm_rsh_agent "$NETNS_AGENT" --mca plm_rsh_no_tree_spawn 1 \
    --mca oob_tcp_if_include "$NETNS_SUBNET.0/24" --mca btl_tcp_if_include "$NETNS_SUBNET.0/24" \
    --mca btl self,vader,tcp --bind-to none "$@"
}

# link_bytes NODE: bytes through the node's veth link (both directions), read on the bridge side.
link_bytes() {
  local stats="/sys/class/net/${NETNS_NODE_LINK[$1]}/statistics"
  echo $(( $(cat "$stats/rx_bytes") + $(cat "$stats/tx_bytes") ))
}
