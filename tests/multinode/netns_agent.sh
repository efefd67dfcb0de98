#!/usr/bin/env bash
# Launch agent for Open MPI (`--mca plm_rsh_agent`) that stands in for ssh on the fake nodes
# of tests/multinode/netns.sh: mpirun calls it like ssh, `netns_agent.sh [options] HOST
# COMMAND...`, and it runs COMMAND (a shell command line, as ssh would) inside HOST's network
# namespace, in a UTS namespace of its own whose hostname is HOST.
#
# Environment (inherited from mpirun, which inherits it from the test):
#   STRATA_NETNS_NODES    "HOST=NAMESPACE HOST=NAMESPACE ...": the fake nodes.
#   STRATA_NETNS_PRIVATE  optional "DIR=ROOT": also a private mount namespace in which ROOT/HOST
#                         is bind-mounted over DIR, so every node sees its own DIR (node-local
#                         scratch storage) while the rest of the filesystem stays shared.
set -euo pipefail

# ssh-style options before the host (none take a value when the agent is not ssh).
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
if [ $# -lt 2 ]; then
  echo "netns_agent: usage: netns_agent.sh [options] HOST COMMAND..." >&2
  exit 255
fi
host=${1#*@}  # user@host -> host
shift
command_line="$*"  # joined with spaces and run by a shell, as ssh does

namespace=""
for entry in ${STRATA_NETNS_NODES:-}; do
  if [ "${entry%%=*}" = "$host" ]; then namespace=${entry#*=}; fi
done
if [ -z "$namespace" ]; then
  echo "netns_agent: unknown host '$host' (STRATA_NETNS_NODES='${STRATA_NETNS_NODES:-}')" >&2
  exit 255
fi

# Runs inside the new namespaces: set the hostname, bind the node's scratch dir, run the command.
# shellcheck disable=SC2016  # expanded by the inner shell
inner='hostname "$1" || exit 255
if [ -n "$3" ]; then
  mount --bind "$4/$1" "$3" || { echo "netns_agent: cannot bind $4/$1 over $3" >&2; exit 255; }
fi
exec bash -c "$2"'

if [ -n "${STRATA_NETNS_PRIVATE:-}" ]; then
  dir=${STRATA_NETNS_PRIVATE%%=*}
  root=${STRATA_NETNS_PRIVATE#*=}
  # unshare --mount makes every mount private: the bind stays inside this node's processes.
  exec ip netns exec "$namespace" unshare --uts --mount bash -c "$inner" netns_agent "$host" \
    "$command_line" "$dir" "$root"
fi
exec ip netns exec "$namespace" unshare --uts bash -c "$inner" netns_agent "$host" "$command_line" "" ""
