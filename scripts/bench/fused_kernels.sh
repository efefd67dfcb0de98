#!/usr/bin/env bash
# Strata's fused CPU kernels against the best ATen equivalent on the same LibTorch, kernel by
# kernel (forward + backward on the tiny and small models' shapes, 1 and 2 threads, alternating
# runs, medians): scripts/bench/fused_kernels.cpp. Builds its program into the build directory.
#   scripts/bench/fused_kernels.sh            (REPS=30 repetitions of each kernel)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${STRATA_BUILD_DIR:-$root/build}"
[ -f "$build/CMakeCache.txt" ] || "$root/scripts/build.sh"
cmake --build "$build" --target bench_fused_kernels >/dev/null
first=1
for shape in tiny small; do
  for threads in 1 2; do
    "$build/bench_fused_kernels" --shape "$shape" --threads "$threads" --reps "${REPS:-30}" |
      if [ "$first" = 1 ]; then cat; else tail -n +3; fi
    first=0
  done
done
