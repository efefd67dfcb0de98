#!/usr/bin/env bash
# The whole test suite on a fresh machine: install dependencies, build, run every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${STRATA_BUILD_DIR:-$root/build}"
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
# Multi-rank tests use mpirun; as root Open MPI needs explicit permission.
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
cd "$build"
ctest --output-on-failure --timeout 900 -LE gpu "$@"  # gpu: scripts/gpu/check.sh
