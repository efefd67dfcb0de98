#!/usr/bin/env bash
# Checks that every C++ source follows the repository's .clang-format (clang-format 14, the
# version scripts/setup.sh installs: other versions format some constructs differently).
# With --fix, formats the files in place instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tool="$(command -v clang-format-14 || true)"
if [ -z "$tool" ]; then
  echo "check_format: clang-format-14 not found; run scripts/setup.sh" >&2
  exit 1
fi
mapfile -t files < <(git ls-files '*.cpp' '*.h')
if [ "${1:-}" = "--fix" ]; then
  "$tool" -i "${files[@]}"
  exit 0
fi
if ! "$tool" --dry-run --Werror "${files[@]}" 2>/tmp/strata-format.$$; then
  grep -E "^[^ ].*: (error|warning):" /tmp/strata-format.$$ | cut -d: -f1 | sort -u | sed 's/^/  /' >&2
  rm -f /tmp/strata-format.$$
  echo "check_format: the files above differ from .clang-format; run scripts/check_format.sh --fix" >&2
  exit 1
fi
rm -f /tmp/strata-format.$$
echo "check_format: ${#files[@]} files follow .clang-format"
