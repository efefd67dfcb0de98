# Shared helpers of the end-to-end tests (sourced; runs in a fresh temp dir, removed on exit).
set -euo pipefail
: "${STRATA_BIN:?set STRATA_BIN to the strata binary}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_error EXPECTED_SUBSTRING CMD...: the command must fail and print the substring.
expect_error() {
  local expected=$1; shift
  if "$@" >out.txt 2>&1; then cat out.txt; fail "expected failure: $*"; fi
  grep -qF -- "$expected" out.txt || { cat out.txt; fail "missing '$expected' in output of: $*"; }
}

# train NP RUN_DIR [ARGS...]: `strata train` on NP ranks with the config $TRAIN_CONFIG (default
# job.yaml) and job.run_dir RUN_DIR, its output in RUN_DIR.log (printed when it fails).
train() {
  local np=$1 dir=$2; shift 2
  mpirun --oversubscribe -np "$np" "$STRATA_BIN" train --config "${TRAIN_CONFIG:-job.yaml}" \
    --set job.run_dir="$dir" "$@" >"$dir.log" 2>&1 || { cat "$dir.log"; fail "train $dir failed"; }
}
