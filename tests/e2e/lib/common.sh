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
