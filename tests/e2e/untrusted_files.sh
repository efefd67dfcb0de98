#!/usr/bin/env bash
# End-to-end: checkpoints and Hugging Face directories are files users get from other people,
# so every path and field read from them is checked. Crafted rank-file names, `latest`
# pointers and weight_map entries that leave their folder (absolute, `..`, a symbolic link) are
# refused; damaged metadata (negative or mismatched steps, a model block that disagrees with
# the tensors, duplicate names, negative shapes, unknown fields, dtype mismatches, a missing or
# inconsistent train_state.json) is refused with the file and the field named; a step
# directory without metadata.json is neither resumed from nor written over.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes --out data --vocab-size 400 \
  --separator % >/dev/null
cat > job.yaml <<YAML
job: {name: untrusted, run_dir: run, seed: 3}
model: {vocab_size: 400, dim: 32, n_layers: 1, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 4, global_batch_size: 4, micro_batch_size: 2, eval_interval: 0, log_interval: 2}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 2, last_save_model_only: false, last_save_in_hf: true}
YAML
"$STRATA_BIN" train --config job.yaml >run.log 2>&1 || { cat run.log; fail "training failed"; }
good=run/checkpoints/step-0000004
hf=run/checkpoints/hf-0000004
"$STRATA_BIN" inspect "$good" --verify >/dev/null || fail "inspect --verify of a good checkpoint"

# edit FILE PYTHON: applies PYTHON to the JSON document `d` of FILE and writes it back.
edit() {
  python3 - "$1" "$2" <<'PY'
import json, sys
path, code = sys.argv[1], sys.argv[2]
d = json.load(open(path))
exec(code)
json.dump(d, open(path, "w"), indent=1)
PY
}
# copy NAME: a fresh copy of the good step directory.
copy() { rm -rf "$1"; cp -r "$good" "$1"; }
# resume_from DIR: training that loads DIR.
resume_from() {
  local from=$1; shift
  "$STRATA_BIN" train --config job.yaml --set job.run_dir="r-$RANDOM" --set checkpoint.resume_path="$from" "$@"
}

# --- Rank-file names in metadata.json that leave the step directory.
rename_rank_file() {  # DIR NEW_NAME: metadata.json lists rank-00000 under NEW_NAME
  edit "$1/metadata.json" "
old = 'rank-00000.safetensors'
d['files']['$2'] = d['files'].pop(old)
for t in d['tensors'].values():
    for c in t['chunks']:
        if c['file'] == old: c['file'] = '$2'"
}
copy climb; cp "$good/rank-00000.safetensors" outside.safetensors
rename_rank_file climb ../outside.safetensors
expect_error "files[\"../outside.safetensors\"] is not a rank file name (rank-NNNNN.safetensors); it climbs out with '..'" \
  "$STRATA_BIN" inspect climb --verify
expect_error "climb/metadata.json is not a valid Strata checkpoint description" resume_from climb
copy absolute; rename_rank_file absolute "$PWD/outside.safetensors"
expect_error "is not a rank file name (rank-NNNNN.safetensors); it is an absolute path" \
  "$STRATA_BIN" inspect absolute --verify
copy linked; mv linked/rank-00000.safetensors elsewhere.safetensors
ln -s ../elsewhere.safetensors linked/rank-00000.safetensors
expect_error "'rank-00000.safetensors' resolves through a symbolic link to $PWD/elsewhere.safetensors, outside $PWD/linked" \
  "$STRATA_BIN" inspect linked --verify
expect_error "resolves through a symbolic link" resume_from linked
echo "rank files: absolute, '..' and symlinked names refused"

# --- The `latest` pointer names a step directory of its folder, nothing else.
mkdir -p ptr/checkpoints other
cp -r run/checkpoints/step-0000002 ptr/checkpoints/
cp -r run/checkpoints/step-0000004 other/
for target in ../../other/step-0000004 "$PWD/other/step-0000004"; do
  echo "$target" >ptr/checkpoints/latest
  expect_error "ptr/checkpoints/latest names '$target', which is not a step directory of that folder" \
    "$STRATA_BIN" train --config job.yaml --set job.run_dir=ptr --set training.steps=6
done
echo step-0000006 >ptr/checkpoints/latest
expect_error "names step-0000006, which is not a committed checkpoint (it does not exist)" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=ptr --set training.steps=6
echo "latest: paths outside the folder and missing steps refused"

# --- A step directory without metadata.json: neither resumed from nor overwritten.
mkdir -p hole/checkpoints
cp -r run/checkpoints/step-0000002 run/checkpoints/step-0000004 hole/checkpoints/
echo step-0000004 >hole/checkpoints/latest
rm hole/checkpoints/step-0000004/metadata.json
before=$(sha256sum hole/checkpoints/step-0000004/* | sha256sum)
expect_error "holds step-0000004, a step directory without metadata.json: not a committed checkpoint" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=hole --set training.steps=6
[ "$(sha256sum hole/checkpoints/step-0000004/* | sha256sum)" = "$before" ] || fail "step-0000004 was modified"
[ ! -e hole/metrics.jsonl ] || fail "a run started over a damaged checkpoint folder"
echo "missing metadata.json: refused, nothing overwritten"

# --- Damaged metadata.json fields.
copy negative; edit negative/metadata.json "d['step'] = -6"
expect_error "negative/metadata.json is not a valid Strata checkpoint description: step = -6 must be >= 0" \
  resume_from negative
copy step-0000009; edit step-0000009/metadata.json "d['step'] = 4"
expect_error "\"step\" is 4 but the directory is step-0000009" resume_from step-0000009
copy shape; edit shape/metadata.json "d['tensors']['norm.weight']['shape'] = [-32]"
expect_error "tensors[\"norm.weight\"].shape[] = -32 must be >= 0" "$STRATA_BIN" inspect shape --verify
copy chunkkey; edit chunkkey/metadata.json "d['tensors']['norm.weight']['chunks'][0]['offset'] = 5"
expect_error "tensors[\"norm.weight\"].chunks[] has an unknown field \"offset\"" "$STRATA_BIN" inspect chunkkey --verify
copy dtype; edit dtype/metadata.json "
t = d['tensors']['norm.weight']; t['dtype'] = 'I32'"
expect_error "rank-00000.safetensors: tensor 'norm.weight' is F32 [32] but metadata.json says I32 [32]" \
  "$STRATA_BIN" inspect dtype --verify
copy duplicate
python3 - duplicate/metadata.json <<'PY'
import sys
p = sys.argv[1]; text = open(p).read()
# The same tensor listed twice: a JSON object with a repeated key.
key = '"norm.weight": {'
start = text.index(key); end = text.index("\n  }", start) + 4
open(p, "w").write(text[:end] + ",\n  " + text[start:end].lstrip() + text[end:])
PY
expect_error "duplicate/metadata.json is not a valid Strata checkpoint description: invalid JSON (the key \"norm.weight\" appears twice in one object)" \
  "$STRATA_BIN" inspect duplicate
copy vocab; edit vocab/metadata.json "d['model']['vocab_size'] = 401"
expect_error "shapes that disagree with metadata.json's \"model\": tok_embeddings.weight is [400, 32] but the model block makes it [401, 32]" \
  "$STRATA_BIN" eval --from vocab --data 'data/val_*.bin' --seq-len 32
edit vocab/metadata.json "d['model']['vocab_size'] = 10**12"
expect_error "the model does not fit in memory" "$STRATA_BIN" eval --from vocab --data 'data/val_*.bin' --seq-len 32
grep -qF "model.vocab_size=1000000000000 (sizes from vocab/metadata.json)" out.txt || { cat out.txt; fail "keys not named"; }
echo "metadata.json: negative and mismatched steps, bad shapes, fields, dtypes, duplicates refused"

# --- train_state.json: present, of its schema, consistent with metadata.json.
copy nostate; rm nostate/train_state.json
expect_error "nostate/train_state.json is damaged: the file is missing" "$STRATA_BIN" inspect nostate --verify
expect_error "nostate/train_state.json is damaged: the file is missing" resume_from nostate
resume_from nostate --set checkpoint.resume_model_only=true >weights.log 2>&1 ||
  { cat weights.log; fail "weights alone need no train_state.json"; }
copy consumed; edit consumed/train_state.json "d['dataloader']['samples_consumed'] = -16"
expect_error "consumed/train_state.json is damaged: dataloader.samples_consumed = -16 is outside" \
  resume_from consumed
copy stepstate; edit stepstate/train_state.json "d['step'] = 3"
expect_error "stepstate/train_state.json is damaged: step = 3 but the checkpoint's metadata.json says 4" \
  "$STRATA_BIN" inspect stepstate --verify
copy badjson; echo '{"step": 4,' >badjson/train_state.json
expect_error "badjson/train_state.json is not valid JSON: parse error at line 2" resume_from badjson
echo "train_state.json: missing, negative and inconsistent fields refused"

# --- weight_map entries of an HF directory that leave it.
mkdir -p outside
cp "$hf"/model-00001-of-00001.safetensors outside/
for entry in ../outside/model-00001-of-00001.safetensors "$PWD/outside/model-00001-of-00001.safetensors"; do
  rm -rf hfmap; cp -r "$hf" hfmap; rm hfmap/model-00001-of-00001.safetensors
  edit hfmap/model.safetensors.index.json "d['weight_map'] = {k: '$entry' for k in d['weight_map']}"
  expect_error "hfmap/model.safetensors.index.json: weight_map[\"lm_head.weight\"]: '$entry' is not a file name inside hfmap" \
    "$STRATA_BIN" eval --from hfmap --data 'data/val_*.bin' --seq-len 32
  expect_error "is not a file name inside hfmap" "$STRATA_BIN" convert --from hfmap --to-strata hfout
  expect_error "is not a file name inside hfmap" resume_from hfmap
done
rm -rf hflink; cp -r "$hf" hflink; rm hflink/model-00001-of-00001.safetensors
ln -s ../outside/model-00001-of-00001.safetensors hflink/model-00001-of-00001.safetensors
expect_error "resolves through a symbolic link" "$STRATA_BIN" eval --from hflink --data 'data/val_*.bin' --seq-len 32
echo "weight_map: absolute, '..' and symlinked files refused"

echo "untrusted files: all checks passed"
