#!/usr/bin/env bash
# A short libFuzzer run of the safetensors header parser (tests/checkpoint/
# fuzz_safetensors_header.cpp) with AddressSanitizer and UBSan, from a seed corpus of valid and
# malformed files. Needs clang++ with libFuzzer; exits 77 (skipped) without it.
#   FUZZ_SECONDS=20 (default) bash tests/checkpoint/fuzz.sh
set -euo pipefail
src="${STRATA_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
clang=$(command -v clang++ || command -v clang++-14 || true)
[ -n "$clang" ] || { echo "fuzz: no clang++: skipped"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    "$clang" -x c++ -fsanitize=fuzzer - -o "$work/probe" 2>/dev/null; then
  echo "fuzz: clang++ has no libFuzzer runtime: skipped"; exit 77
fi
"$clang" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$src" "$src/tests/checkpoint/fuzz_safetensors_header.cpp" "$src/checkpoint/safetensors_header.cpp" \
  -lfmt -o "$work/fuzz"
mkdir "$work/corpus"
python3 - "$work/corpus" <<'PY'
import json, struct, sys
out = sys.argv[1]
def image(header, data=b""):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data
seeds = {
    "empty": image({}),
    "one": image({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "two": image({"b": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [0, 6]},
                  "c": {"dtype": "I64", "shape": [], "data_offsets": [6, 14]}}, b"\1" * 14),
    "gap": image({"a": {"dtype": "F16", "shape": [1], "data_offsets": [2, 4]}}, b"\0" * 4),
    "short": b"\x10\0\0\0\0\0\0\0{}",
}
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY
"$work/fuzz" -max_total_time="${FUZZ_SECONDS:-20}" -max_len=4096 -print_final_stats=1 "$work/corpus" 2>&1 | tail -12
echo "fuzz: no crash in ${FUZZ_SECONDS:-20} s"
