#!/usr/bin/env bash
# End-to-end: `strata prepare-data` on real text, reuse of its tokenizer, and bad inputs.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
fortunes=/usr/share/games/fortunes

"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" "$fortunes/literature" --out a \
  --vocab-size 512 --separator % >out.txt
grep -q "unigram entropy" out.txt || { cat out.txt; fail "no summary"; }
for f in tokenizer.model train_000000.bin val_000000.bin meta.json; do
  [ -s "a/$f" ] || fail "a/$f missing"
done
ls -A a | grep -q '^\.' && fail "leftover temporary files: $(ls -A a)"
python3 - <<'PY'
import json, math, struct
meta = json.load(open("a/meta.json"))
assert meta["vocab_size"] == 512, meta
assert meta["tokens"]["train"] > 10 * meta["tokens"]["val"] > 0, meta
assert meta["documents"]["train"] > 10 * meta["documents"]["val"] > 0, meta
assert 2.0 < meta["unigram_entropy_nats"] < math.log(512), meta
assert meta["files"] == 2 and meta["inputs"][0].endswith("fortunes"), meta
for split in ("train", "val"):
    assert meta[f"{split}_shards"] == [f"a/{split}_000000.bin"], meta
    with open(f"a/{split}_000000.bin", "rb") as f:
        magic, version, count = struct.unpack("<3i", f.read(12))
        first = struct.unpack("<H", f.read(1024 - 12 + 2)[-2:])[0]
        f.seek(0, 2)
        assert (magic, version) == (20240520, 1), (magic, version)
        assert f.tell() == 1024 + 2 * count == 1024 + 2 * meta["tokens"][split], (f.tell(), count)
        assert first == 1, f"{split} does not start with BOS: {first}"
PY

# A directory input (binary .dat files and .u8 links skipped) with the tokenizer reused.
mkdir corpus && cp "$fortunes/goedel" "$fortunes/goedel.dat" corpus/ && ln -s goedel corpus/goedel.u8
"$STRATA_BIN" prepare-data --input corpus --out b --tokenizer a/tokenizer.model --separator % \
  --shard-tokens 1000 >/dev/null
cmp a/tokenizer.model b/tokenizer.model || fail "tokenizer not reused"
[ -s b/train_000001.bin ] || fail "--shard-tokens 1000 wrote one train shard only"
python3 - <<'PY'
import json, os
m = json.load(open("b/meta.json"))
assert m["vocab_size"] == 512 and m["files"] == 1 and m["files_skipped"] == 2, m
assert len(m["train_shards"]) >= 2 and m["tokens"]["val"] > 0, m
sizes = sum(os.path.getsize(p) - 1024 for p in m["train_shards"])
assert sizes == 2 * m["tokens"]["train"], (sizes, m)
PY

# Bad inputs fail with one clear message, and a failed run leaves the earlier output alone.
cp a/meta.json meta.before
expect_error "input nowhere.txt does not exist" "$STRATA_BIN" prepare-data --input nowhere.txt --out c
expect_error "input pattern 'nowhere/*.txt' matches nothing" \
  "$STRATA_BIN" prepare-data --input 'nowhere/*.txt' --out c
expect_error "--val-fraction 1.5 is out of range" \
  "$STRATA_BIN" prepare-data --input "$fortunes/goedel" --out c --val-fraction 1.5
expect_error "lower --vocab-size to at most" \
  "$STRATA_BIN" prepare-data --input "$fortunes/goedel" --out a --vocab-size 30000
cmp a/meta.json meta.before || fail "a failed run changed a/meta.json"
cmp a/tokenizer.model b/tokenizer.model || fail "a failed run changed a/tokenizer.model"
expect_error "--input is required" "$STRATA_BIN" prepare-data --out c
echo "prepare_data: all checks passed"
