#!/usr/bin/env bash
# End-to-end: `strata prepare-data` on real text, reuse of its tokenizer, and bad inputs.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
fortunes=/usr/share/games/fortunes

"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" "$fortunes/literature" --out a \
  --vocab-size 400 --separator % >out.txt
grep -q "unigram entropy" out.txt || { cat out.txt; fail "no summary"; }
for f in tokenizer.model train_000000.bin val_000000.bin meta.json; do
  [ -s "a/$f" ] || fail "a/$f missing"
done
python3 - <<'PY'
import json, struct
meta = json.load(open("a/meta.json"))
assert meta["vocab_size"] == 400, meta
assert meta["tokens"]["train"] > 10 * meta["tokens"]["val"] > 0, meta
for split in ("train", "val"):
    with open(f"a/{split}_000000.bin", "rb") as f:
        magic, version, count = struct.unpack("<3i", f.read(12))
        f.seek(0, 2)
        assert (magic, version) == (20240520, 1), (magic, version)
        assert f.tell() == 1024 + 2 * count == 1024 + 2 * meta["tokens"][split], (f.tell(), count)
PY

# A directory input (binary .dat files and .u8 links skipped) with the tokenizer reused.
mkdir corpus && cp "$fortunes/goedel" "$fortunes/goedel.dat" corpus/ && ln -s goedel corpus/goedel.u8
"$STRATA_BIN" prepare-data --input corpus --out b --tokenizer a/tokenizer.model --separator % >/dev/null
cmp a/tokenizer.model b/tokenizer.model || fail "tokenizer not reused"
python3 -c 'import json; m = json.load(open("b/meta.json")); assert m["files"] == 1 and m["files_skipped"] == 2, m'

expect_error "is neither a file nor a directory" "$STRATA_BIN" prepare-data --input nowhere.txt --out c
expect_error "matches no text file" "$STRATA_BIN" prepare-data --input 'nowhere/*.txt' --out c
expect_error "--val-fraction 1.5 is out of range" "$STRATA_BIN" prepare-data --input "$fortunes/goedel" --out c --val-fraction 1.5
expect_error "adjust --vocab-size" "$STRATA_BIN" prepare-data --input "$fortunes/goedel" --out c --vocab-size 30000
expect_error "--input is required" "$STRATA_BIN" prepare-data --out c
echo "prepare_data: all checks passed"
