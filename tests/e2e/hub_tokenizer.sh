#!/usr/bin/env bash
# End-to-end: a Hub spec as the tokenizer, against the fake Hub (tests/fixtures/fake_hub.py).
# `prepare-data --tokenizer hf://...` (text and jsonl with the repo's chat template), `tokenize`,
# `chat-template`, `generate --tokenizer` and `data.tokenizer` (1 and 2 ranks) fetch the
# tokenizer files alone, never the weights beside them, give the ids of the local
# tokenizer.json, work from the cache offline and with the Hub down, and fail with messages that
# name the spec for a repo without a tokenizer and for an unknown repo.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

hub_pid=""
stop_hub() { if [ -n "$hub_pid" ]; then kill "$hub_pid" 2>/dev/null || true; wait "$hub_pid" 2>/dev/null || true; hub_pid=""; fi; }
trap 'stop_hub; rm -rf "$work"' EXIT
fortunes=/usr/share/games/fortunes

# A byte-level BPE tokenizer.json (every byte a token, a few merges, BOS and EOS added tokens)
# with a tokenizer_config.json that names them and holds a chat template.
mkdir tok
python3 - tok "$STRATA_SOURCE_DIR/configs/sft_chat_template.jinja" <<'PY'
import json, sys
out, template = sys.argv[1], open(sys.argv[2]).read()
bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
vocab = {chr(c): i for i, c in enumerate(cs)}
merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["i", "n"], ["e", "r"], ["a", "n"], ["o", "u"], ["Ġ", "a"]]
for a, b in merges:
    vocab[a + b] = len(vocab)
bos, eos = len(vocab), len(vocab) + 1
def added(i, text):
    return {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}
byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [added(bos, "<|bos|>"), added(eos, "<|eos|>")],
    "normalizer": None, "pre_tokenizer": byte_level,
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [],
                       "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [bos], "tokens": ["<|bos|>"]}}},
    "decoder": byte_level,
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "ignore_merges": False, "vocab": vocab, "merges": merges},
}
json.dump(tokenizer, open(f"{out}/tokenizer.json", "w"), ensure_ascii=False)
json.dump({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": template,
           "model_max_length": 64}, open(f"{out}/tokenizer_config.json", "w"))
json.dump({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}, open(f"{out}/special_tokens_map.json", "w"))
PY

# Repos: owner/model holds the tokenizer beside a config and big weights (which must never be
# fetched), sub/ another copy; owner/weights has no tokenizer file; owner/configonly a
# tokenizer_config.json alone.
mkdir -p model/sub weights configonly
cp tok/* model/
cp tok/* model/sub/
echo '{"model_type": "llama"}' > model/config.json
head -c $((8 << 20)) /dev/urandom > model/model.safetensors
head -c $((1 << 20)) /dev/urandom > model/sub/model.safetensors
echo "# card" > model/README.md
cp model/config.json model/model.safetensors weights/
cp tok/tokenizer_config.json configonly/
weights_sha=$(sha256sum model/model.safetensors | cut -d' ' -f1)

token=hf_e2e_tok_secret_4b1d
start_hub() {
  rm -f port
  python3 "$STRATA_SOURCE_DIR/tests/fixtures/fake_hub.py" --repo owner/model=model --repo owner/weights=weights \
    --repo owner/configonly=configonly --port-file port --page-size 2 --token "$token" --log hub.jsonl &
  hub_pid=$!
  for _ in $(seq 100); do [ -s port ] && break; sleep 0.1; done
  [ -s port ] || fail "the fake Hub did not start"
  export HF_ENDPOINT="http://127.0.0.1:$(cat port)"
}
reset_hub() { curl -sf -X POST "$HF_ENDPOINT/_reset" >/dev/null; }
stats() { curl -sf "$HF_ENDPOINT/_stats"; }
start_hub
export HF_HOME="$work/hf-home" HF_HUB_CACHE="$work/cache" HF_TOKEN="$token" STRATA_HUB_ATTEMPTS=2 HF_HUB_DOWNLOAD_TIMEOUT=2
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HUGGING_FACE_HUB_TOKEN HF_TOKEN_PATH HF_HUB_DISABLE_IMPLICIT_TOKEN

# No request of these runs may touch a weights file or config.json.
no_weights_fetched() {  # WHAT
  stats | python3 -c "
import json, sys
s = json.load(sys.stdin)
bad = [r['method'] + ' ' + r['path'] for r in s['requests']
       if r['path'].startswith('/cdn/') or r['path'].endswith(('.safetensors', '/config.json', 'README.md'))]
assert not bad, '$1: fetched %s' % bad" || fail "$1 fetched files other than the tokenizer's"
}
blobs_are_tokenizer_files() {  # CACHE: every blob is one of tok/'s files
  python3 - "$1" <<'PY' || fail "the cache holds files other than the tokenizer's"
import hashlib, os, sys
cache = sys.argv[1]
blobs = os.path.join(cache, "models--owner--model", "blobs")
tok = {}
for name in os.listdir("tok"):
    data = open(os.path.join("tok", name), "rb").read()
    tok[hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()] = name
got = sorted(os.listdir(blobs))
assert got and all(b in tok for b in got), (got, tok)
for b in got:
    assert os.path.getsize(os.path.join(blobs, b)) < (1 << 20), b
PY
}

# --- prepare-data: the Hub spec gives the ids of the local tokenizer.json.
"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --separator % --out local --tokenizer tok/tokenizer.json >local.log 2>&1 ||
  { cat local.log; fail "prepare-data with the local tokenizer.json"; }
"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --separator % --out hub --tokenizer hf://owner/model >hub.log 2>hub.err ||
  { cat hub.log hub.err; fail "prepare-data --tokenizer hf://owner/model"; }
for f in train_000000.bin val_000000.bin tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cmp "local/$f" "hub/$f" || fail "hub/$f differs from the local tokenizer's"
done
grep -q "hub: hf://owner/model -> commit [0-9a-f]\{12\} (downloaded; 3 files, 3 downloaded" hub.err || { cat hub.err; fail "no summary line"; }
commit=$(ls "$HF_HUB_CACHE/models--owner--model/snapshots")
snap="$HF_HUB_CACHE/models--owner--model/snapshots/$commit"
grep -qE "tokenizer  (.*/)?hub/tokenizer.json \(vocab 266\)" hub.log || { cat hub.log; fail "the report: tokenizer"; }
[ "$(ls "$snap" | tr '\n' ' ')" = "special_tokens_map.json tokenizer.json tokenizer_config.json " ] ||
  fail "the snapshot holds more than the tokenizer files: $(ls "$snap")"
[ "$(cat "$HF_HUB_CACHE/models--owner--model/refs/main")" = "$commit" ] || fail "refs/main"
blobs_are_tokenizer_files "$HF_HUB_CACHE"
no_weights_fetched "prepare-data"

# A subfolder, and a second resolution from the cache (nothing fetched).
reset_hub
"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --separator % --out hubsub --tokenizer hf://owner/model/sub@main >sub.log 2>&1 ||
  { cat sub.log; fail "prepare-data --tokenizer hf://owner/model/sub@main"; }
cmp local/train_000000.bin hubsub/train_000000.bin || fail "the subfolder's tokenizer gives other ids"
[ "$(ls "$snap/sub" | tr '\n' ' ')" = "special_tokens_map.json tokenizer.json tokenizer_config.json " ] ||
  fail "the subfolder snapshot holds more than the tokenizer files: $(ls "$snap/sub")"
"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --separator % --out hub2 --tokenizer hf://owner/model >hub2.log 2>hub2.err ||
  { cat hub2.log hub2.err; fail "prepare-data from the cache"; }
grep -q "(cached; 3 files, 0 downloaded" hub2.err || { cat hub2.err; fail "the cached resolution downloaded"; }
no_weights_fetched "prepare-data (subfolder, cached)"

# --- jsonl: the repo's tokenizer_config.json is the default chat template.
python3 "$STRATA_SOURCE_DIR/scripts/make_chat_data.py" chat.jsonl --records 40 >/dev/null
"$STRATA_BIN" prepare-data --format jsonl --input chat.jsonl --out sft_local --tokenizer tok --seq-len 64 >sft_local.log 2>&1 ||
  { cat sft_local.log; fail "jsonl with the local tokenizer"; }
"$STRATA_BIN" prepare-data --format jsonl --input chat.jsonl --out sft_hub --tokenizer hf://owner/model --seq-len 64 >sft_hub.log 2>&1 ||
  { cat sft_hub.log; fail "jsonl with a Hub tokenizer"; }
grep -qF "chat template $snap/tokenizer_config.json" sft_hub.log || { cat sft_hub.log; fail "the chat template is not the repo's"; }
for f in $(cd sft_local && ls *.bin); do cmp "sft_local/$f" "sft_hub/$f" || fail "jsonl: sft_hub/$f differs"; done

# --- tokenize and chat-template take specs too.
printf 'The quick brown fox, the end.\n' > text.txt
"$STRATA_BIN" tokenize --tokenizer tok --input text.txt --add-special-tokens > ids_local.json
"$STRATA_BIN" tokenize --tokenizer hf://owner/model --input text.txt --add-special-tokens > ids_hub.json 2>tokenize.err ||
  { cat ids_hub.json tokenize.err; fail "tokenize --tokenizer hf://owner/model"; }
cmp ids_local.json ids_hub.json || fail "tokenize: $(cat ids_hub.json) != $(cat ids_local.json)"
[ "$(wc -l < ids_hub.json)" -eq 1 ] || fail "tokenize printed more than the ids on stdout"
echo '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]' > messages.json
"$STRATA_BIN" chat-template --template tok --messages messages.json > chat_local.txt
"$STRATA_BIN" chat-template --template hf://owner/model --messages messages.json > chat_hub.txt 2>chat.err ||
  { cat chat.err; fail "chat-template --template hf://owner/model"; }
cmp chat_local.txt chat_hub.txt || fail "chat-template: the Hub's template renders differently"
grep -qF "### Answer: hello<|eos|>" chat_hub.txt || { cat chat_hub.txt; fail "chat-template: eos_token"; }
no_weights_fetched "jsonl, tokenize, chat-template"

# --- data.tokenizer: training samples and generate with the Hub's tokenizer.
cat > job.yaml <<YAML
job: {name: tok, run_dir: run, seed: 7}
model: {vocab_size: 272, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "hub/train_*.bin", val: "hub/val_*.bin", tokenizer: "hf://owner/model", seq_len: 32}
training: {steps: 2, global_batch_size: 4, micro_batch_size: 2, eval_interval: 2, eval_batches: 1, log_interval: 1}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 2}
YAML
export HF_HUB_CACHE="$work/cache-train"
reset_hub
"$STRATA_BIN" train --config job.yaml >train.log 2>&1 || { cat train.log; fail "train with data.tokenizer: hf://owner/model"; }
grep -q "^hub: hf://owner/model -> commit" train.log || { cat train.log; fail "train: no summary line"; }
blobs_are_tokenizer_files "$HF_HUB_CACHE"
"$STRATA_BIN" train --config job.yaml --print-config >printed.yaml || fail "--print-config"
grep -qF 'tokenizer: "hf://owner/model"' printed.yaml || { cat printed.yaml; fail "--print-config does not show the spec"; }
"$STRATA_BIN" generate --from run/checkpoints --tokenizer hf://owner/model --prompt "The" --max-new-tokens 4 \
  --temperature 0 >gen.out 2>gen.err || { cat gen.out gen.err; fail "generate --tokenizer hf://owner/model"; }
[ "$(wc -l < gen.out)" -eq 1 ] || { cat gen.out; fail "generate printed more than its text on stdout"; }
grep -q "^The" gen.out || { cat gen.out; fail "generate: the prompt is not decoded first"; }
no_weights_fetched "train, generate"
# 2 ranks: one download of each tokenizer file.
export HF_HUB_CACHE="$work/cache-ranks"
reset_hub
timeout 300 mpirun --oversubscribe -np 2 "$STRATA_BIN" train --config job.yaml --set job.run_dir=np2 >np2.log 2>&1 ||
  { cat np2.log; fail "2-rank train with data.tokenizer: hf://owner/model"; }
stats | python3 -c "
import json, sys
c = json.load(sys.stdin)['counts']
files = [k for k in c if '/resolve/' in k]
assert len(files) == 6, c  # HEAD and GET of the 3 tokenizer files
assert all(c[k] == 1 for k in files), c
assert c['GET /api/models/owner/model/revision/main'] == 1, c" || fail "2 ranks: each file once"
no_weights_fetched "train on 2 ranks"

# --- Offline (HF_HUB_OFFLINE=1, the Hub stopped), then the Hub down: the cache answers.
export HF_HUB_CACHE="$work/cache"
stop_hub
HF_HUB_OFFLINE=1 "$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --separator % --out off --tokenizer hf://owner/model >off.log 2>off.err ||
  { cat off.log off.err; fail "offline prepare-data"; }
cmp local/train_000000.bin off/train_000000.bin || fail "offline: other ids"
grep -qF "from the cache (HF_HUB_OFFLINE is set)" off.err || { cat off.err; fail "offline: no summary"; }
HF_HUB_OFFLINE=1 "$STRATA_BIN" tokenize --tokenizer hf://owner/model --input text.txt --add-special-tokens > ids_off.json 2>/dev/null ||
  fail "offline tokenize"
cmp ids_local.json ids_off.json || fail "offline tokenize: other ids"
"$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --separator % --out down --tokenizer hf://owner/model >down.log 2>down.err ||
  { cat down.log down.err; fail "prepare-data with the Hub down"; }
cmp local/train_000000.bin down/train_000000.bin || fail "Hub down: other ids"
grep -q "WARNING: cannot resolve Hub spec 'hf://owner/model'.*using the cached snapshot" down.err ||
  { cat down.err; fail "no warning when the Hub is down"; }
# A tokenizer-only cache does not serve the model, nor a revision never fetched.
HF_HUB_OFFLINE=1 expect_error "is incomplete:" "$STRATA_BIN" eval --from hf://owner/model --data "hub/val_*.bin"
HF_HUB_OFFLINE=1 expect_error "Hub spec 'hf://owner/model@v2' (repo owner/model, revision v2) is not available: HF_HUB_OFFLINE is set, and it is not in the cache" \
  "$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --out offv2 --tokenizer hf://owner/model@v2
grep -qF "hf download owner/model --revision v2 --include 'tokenizer*' 'special_tokens_map.json'" out.txt ||
  { cat out.txt; fail "offline: no download hint for the tokenizer files"; }
start_hub

# --- Errors: no tokenizer in the repo, a config without a tokenizer, an unknown repo.
export HF_HUB_CACHE="$work/cache-errors"
reset_hub
check_error() {  # EXPECTED SPEC
  expect_error "$1" "$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --out bad --tokenizer "$2"
  grep -qF "$token" out.txt && fail "the token appears in the output"
  [ ! -e bad ] || fail "prepare-data wrote bad/ for a tokenizer that failed"
  cat out.txt >> errors.log
}
check_error "cannot resolve Hub spec 'hf://owner/weights' (repo owner/weights, revision main) from $HF_ENDPOINT: the repo has no tokenizer file (tokenizer.json, tokenizer_config.json, tokenizer.model, special_tokens_map.json) at its top level at commit" hf://owner/weights
grep -qF "a tokenizer needs tokenizer.json (a Hugging Face tokenizer) or tokenizer.model (SentencePiece), with tokenizer_config.json and special_tokens_map.json beside it" out.txt ||
  { cat out.txt; fail "no tokenizer: what a tokenizer needs"; }
grep -qF "HINT: give the repo (or its subfolder) that holds the model's tokenizer" out.txt || { cat out.txt; fail "no tokenizer: no hint"; }
check_error "cannot resolve Hub spec 'hf://owner/configonly' (repo owner/configonly, revision main) from $HF_ENDPOINT: the downloaded files do not form a tokenizer Strata can load (a tokenizer needs tokenizer.json" hf://owner/configonly
grep -qF "missing: $HF_HUB_CACHE/models--owner--configonly/snapshots/" out.txt || { cat out.txt; fail "configonly: what is missing"; }
check_error "cannot resolve Hub spec 'hf://owner/nope' (repo owner/nope, revision main) from $HF_ENDPOINT: HTTP 404 (RepoNotFound: Repository not found) for GET $HF_ENDPOINT/api/models/owner/nope/revision/main" hf://owner/nope
grep -qF "HINT: the token from HF_TOKEN was sent; for a private or gated repo set HF_TOKEN" out.txt || { cat out.txt; fail "unknown repo: no hint"; }
# A bare owner/repo that is no local path either says so.
check_error "cannot resolve Hub spec 'owner/nope' (repo owner/nope, revision main)" owner/nope
grep -qF "'owner/nope' names no local file or directory either" out.txt || { cat out.txt; fail "bare spec: not said to be no local path"; }
check_error "subfolder missing does not exist at commit" hf://owner/model/missing
stats | python3 -c "
import json, sys
s = json.load(sys.stdin)
assert not [r for r in s['requests'] if r['path'].startswith('/cdn/') or r['path'].endswith('.safetensors')], s['counts']" ||
  fail "errors: weights fetched"
[ ! -e "$HF_HUB_CACHE/models--owner--weights/blobs" ] || [ -z "$(ls "$HF_HUB_CACHE/models--owner--weights/blobs")" ] ||
  fail "a blob was written for the repo without a tokenizer"

# A missing local tokenizer file is reported as such, not looked up on the Hub.
reset_hub
expect_error "tokenizer nowhere/tokenizer.model does not exist" \
  "$STRATA_BIN" prepare-data --input "$fortunes/fortunes" --out missing --tokenizer nowhere/tokenizer.model
expect_error "cannot read templates/chat.jinja" "$STRATA_BIN" chat-template --template templates/chat.jinja --messages messages.json
[ "$(stats | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["requests"]))')" = 0 ] ||
  fail "a missing local file was looked up on the Hub"

# --- The token never reaches logs or the cache.
if grep -rlF "$token" "$work" --exclude=hub.jsonl; then fail "the token was written somewhere"; fi
echo "hub_tokenizer: ok"
