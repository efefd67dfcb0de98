#!/usr/bin/env bash
# The GPU check's CPU mode (scripts/gpu/check.sh --cpu) on the built binary: the same checks as
# on a GPU machine with a micro model, so the script itself stays working where CI has no GPU.
# Every check must print its summary line; parity, bf16, resume and bench must pass; ctest only
# lists the gpu-labelled tests on CPU.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
: "${STRATA_SOURCE_DIR:?set STRATA_SOURCE_DIR to the source tree}"

export GPU_CHECK_LOG="$work/gpu-check.log"
rc=0
STRATA_BIN="$STRATA_BIN" "$STRATA_SOURCE_DIR/scripts/gpu/check.sh" --cpu >out.txt 2>&1 || rc=$?
[ -s "$GPU_CHECK_LOG" ] || { cat out.txt; fail "no log written to $GPU_CHECK_LOG"; }
cmp -s out.txt "$GPU_CHECK_LOG" || { cat out.txt; fail "the log differs from the output"; }
summary() { grep "^gpu-check: $1: " out.txt | tail -1; }
for check in ctest parity bf16 resume bench; do
  [ -n "$(summary $check)" ] || { cat out.txt; fail "no summary line for $check"; }
done
for check in parity bf16 resume bench; do
  summary $check | grep -q ": PASS: " || { cat out.txt; fail "$check did not pass: $(summary $check)"; }
done
summary ctest | grep -q ": SKIP: .*not run on CPU" || { cat out.txt; fail "ctest: $(summary ctest)"; }
grep -q "^| Strata | [0-9]" out.txt || { cat out.txt; fail "no benchmark table"; }
grep -q "^| PyTorch eager | [0-9]" out.txt || { cat out.txt; fail "no eager row in the benchmark table"; }
[ "$rc" -eq 0 ] || { cat out.txt; fail "check.sh --cpu exited $rc"; }
sed -n '/^=== summary/,$p' out.txt
echo "gpu check (--cpu): every check reported, exit 0"
