#!/usr/bin/env bash
# A short libFuzzer run, with AddressSanitizer and UBSan, of one parser of untrusted files, from a
# seed corpus of valid and malformed inputs:
#   safetensors_header   the safetensors header parser (tests/checkpoint/fuzz_safetensors_header.cpp)
#   checkpoint_metadata  metadata.json and train_state.json validation
#                        (tests/checkpoint/fuzz_checkpoint_metadata.cpp)
# Needs clang++ with libFuzzer; exits 77 (skipped) without it.
#   FUZZ_SECONDS=20 (default) bash tests/checkpoint/fuzz.sh [TARGET]
set -euo pipefail
src="${STRATA_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
target="${1:-safetensors_header}"
case "$target" in
  safetensors_header) sources=("$src/checkpoint/safetensors_header.cpp") ;;
  checkpoint_metadata)
    sources=("$src/checkpoint/checkpoint_metadata.cpp" "$src/checkpoint/json_file.cpp"
             "$src/checkpoint/safe_path.cpp" "$src/checkpoint/safetensors_header.cpp"
             "$src/trainer/train_state.cpp") ;;
  *) echo "fuzz: unknown target '$target' (safetensors_header, checkpoint_metadata)" >&2; exit 2 ;;
esac
clang=$(command -v clang++ || command -v clang++-14 || true)
[ -n "$clang" ] || { echo "fuzz: no clang++: skipped"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    "$clang" -x c++ -fsanitize=fuzzer - -o "$work/probe" 2>/dev/null; then
  echo "fuzz: clang++ has no libFuzzer runtime: skipped"; exit 77
fi
"$clang" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$src" "$src/tests/checkpoint/fuzz_$target.cpp" "${sources[@]}" -lfmt -o "$work/fuzz"
mkdir "$work/corpus"
python3 - "$work/corpus" "$target" <<'PY'
import json, struct, sys
out, target = sys.argv[1], sys.argv[2]
def image(header, data=b""):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data
if target == "safetensors_header":
    seeds = {
        "empty": image({}),
        "one": image({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "two": image({"b": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [0, 6]},
                      "c": {"dtype": "I64", "shape": [], "data_offsets": [6, 14]}}, b"\1" * 14),
        "gap": image({"a": {"dtype": "F16", "shape": [1], "data_offsets": [2, 4]}}, b"\0" * 4),
        "short": b"\x10\0\0\0\0\0\0\0{}",
    }
else:
    f = {"size": 96, "sha256": "ab" * 32, "block_bytes": 4194304, "block_xxh3": "0123456789abcdef"}
    meta = {"format": "strata-checkpoint", "format_version": 1, "step": 7, "world_size": 2,
            "model_only": False, "model": {"dim": 8},
            "files": {"rank-00000.safetensors": f, "rank-00001.safetensors": dict(f)},
            "tensors": {"w": {"dtype": "F32", "shape": [2, 3], "chunks": [
                {"file": "rank-00000.safetensors", "key": "w", "begin": 0, "end": 4},
                {"file": "rank-00001.safetensors", "key": "w", "begin": 4, "end": 6}]},
                        "s": {"dtype": "BF16", "shape": [], "chunks": [
                {"file": "rank-00001.safetensors", "key": "s", "begin": 0, "end": 1}]}}}
    state = {"step": 7, "world_size": 2, "optimizer": {"name": "adamw", "steps_taken": 7},
             "lr_scheduler": {"step": 7, "total_steps": 10},
             "dataloader": {"seed": 1234, "step": 7, "samples_consumed": 56, "global_batch_size": 8},
             "rng": {"sample_seed": 18446744073709551615, "note": "n"}}
    seeds = {
        "metadata": json.dumps(meta, indent=1).encode(),
        "train_state": json.dumps(state, indent=1).encode(),
        "duplicate": b'{"step": 7, "step": -1}',
        "deep": b"[" * 40 + b"]" * 40,
        "bad": b'{"format": "strata-checkpoint", "files": {"../x": {}}}',
    }
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY
"$work/fuzz" -max_total_time="${FUZZ_SECONDS:-20}" -max_len=4096 -print_final_stats=1 "$work/corpus" 2>&1 | tail -12
echo "fuzz: $target: no crash in ${FUZZ_SECONDS:-20} s"
