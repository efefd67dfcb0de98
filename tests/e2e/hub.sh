#!/usr/bin/env bash
# End-to-end Hub loading against the fake Hub (tests/fixtures/fake_hub.py): `resume_path` and
# `--from` given as hf:// specs download into an empty HF cache with huggingface_hub's exact
# layout, give the same weights as the local directory, work offline afterwards (and when the
# Hub is down), resume an interrupted download with Range, map each HTTP error to its message,
# never leak the token (not even to a server that echoes it back), end listings that loop and
# downloads that stall, refuse listed names outside the repo, fetch each file once for 4 ranks,
# and fail all 4 ranks with one message when the download fails.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

hub_pid=""
stop_hub() { if [ -n "$hub_pid" ]; then kill "$hub_pid" 2>/dev/null || true; wait "$hub_pid" 2>/dev/null || true; hub_pid=""; fi; }
trap 'stop_hub; rm -rf "$work"' EXIT

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null

# A model to publish: 6 steps, a Strata checkpoint folder and a sharded HF export.
cat > job.yaml <<YAML
job: {name: hub, run_dir: run, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 6, global_batch_size: 12, micro_batch_size: 2, eval_interval: 6, eval_batches: 1, log_interval: 3}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 3, hf_max_shard_size: 40KB}
YAML
"$STRATA_BIN" train --config job.yaml >publish.log 2>&1 || { cat publish.log; fail "publishing run failed"; }
export_dir=$(ls -d run/checkpoints/hf-* | tail -1)
[ "$(ls "$export_dir"/model-*.safetensors | wc -l)" -ge 2 ] || fail "expected a sharded export in $export_dir"

# The repo: main has the export under sub/ (plus files Strata must not fetch) and the Strata
# checkpoint folder under ckpt/; v1 is another revision.
mkdir -p repo/sub repo/other repo_v1/sub
cp "$export_dir"/* repo/sub/
echo "# model card" > repo/sub/README.md
head -c 1000 /dev/urandom > repo/sub/pytorch_model.bin
echo '{}' > repo/other/config.json
cp -r run/checkpoints repo/ckpt
rm -rf repo/ckpt/hf-*
cp "$export_dir"/* repo_v1/sub/

token=hf_e2e_secret_7f3a9c
start_hub() {  # [extra fake_hub.py args]
  rm -f port
  python3 "$STRATA_SOURCE_DIR/tests/fixtures/fake_hub.py" --repo owner/repo=repo --repo owner/repo@v1=repo_v1 \
    --rename old/name=owner/repo --port-file port --page-size 3 --token "$token" --log hub.jsonl "$@" &
  hub_pid=$!
  for _ in $(seq 100); do [ -s port ] && break; sleep 0.1; done
  [ -s port ] || fail "the fake Hub did not start"
  export HF_ENDPOINT="http://127.0.0.1:$(cat port)"
}
control() { curl -sf -X POST --data "$1" "$HF_ENDPOINT/_control" >/dev/null; }
reset_hub() { curl -sf -X POST "$HF_ENDPOINT/_reset" >/dev/null; }
stats() { curl -sf "$HF_ENDPOINT/_stats"; }
start_hub
export HF_HOME="$work/hf-home" HF_HUB_CACHE="$work/cache" HF_TOKEN="$token" STRATA_HUB_ATTEMPTS=3 HF_HUB_DOWNLOAD_TIMEOUT=2
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HUGGING_FACE_HUB_TOKEN HF_TOKEN_PATH HF_HUB_DISABLE_IMPLICIT_TOKEN

eval_loss() {  # FROM [LOG]: the JSON loss of `strata eval`
  "$STRATA_BIN" eval --from "$1" --data "data/val_*.bin" --max-tokens 2048 >"${2:-eval.log}" 2>&1 ||
    { cat "${2:-eval.log}"; fail "eval --from $1 failed"; }
  tail -1 "${2:-eval.log}"
}

# --- Download into an empty cache: same weights as the local directory, exact layout.
local_loss=$(eval_loss "$export_dir")
hub_loss=$(eval_loss hf://owner/repo/sub@main eval_hub.log)
[ "$hub_loss" = "$local_loss" ] || fail "hub eval $hub_loss != local eval $local_loss"
grep -q "hub: hf://owner/repo/sub@main -> commit" eval_hub.log || { cat eval_hub.log; fail "no summary line"; }
commit=$(curl -sf -H "Authorization: Bearer $token" "$HF_ENDPOINT/api/models/owner/repo/revision/main" |
  python3 -c "import json,sys; print(json.load(sys.stdin)['sha'])")
python3 - "$HF_HUB_CACHE" "$commit" repo/sub <<'PY'
import hashlib, os, sys
cache, commit, src = sys.argv[1:]
repo = os.path.join(cache, "models--owner--repo")
assert sorted(os.listdir(cache)) == [".locks", "CACHEDIR.TAG", "models--owner--repo"], os.listdir(cache)
assert sorted(os.listdir(repo)) == ["blobs", "refs", "snapshots"], os.listdir(repo)
ref = open(os.path.join(repo, "refs", "main"), "rb").read()
assert ref == commit.encode(), ref  # exactly the 40 hex digits, no newline
assert os.listdir(os.path.join(repo, "snapshots")) == [commit]
snap = os.path.join(repo, "snapshots", commit)
assert os.listdir(snap) == ["sub"], os.listdir(snap)  # nothing outside the subfolder
wanted = sorted(f for f in os.listdir(src) if f.endswith((".json", ".safetensors", ".model")))
got = sorted(os.listdir(os.path.join(snap, "sub")))
assert got == wanted, (got, wanted)  # no README.md, no pytorch_model.bin
blobs = set()
for name in got:
    path = os.path.join(snap, "sub", name)
    data = open(os.path.join(src, name), "rb").read()
    if name.endswith(".safetensors"):
        etag = hashlib.sha256(data).hexdigest()
    else:
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert os.path.islink(path) and os.readlink(path) == "../../../blobs/" + etag, (name, os.readlink(path))
    assert open(path, "rb").read() == data, name
    assert os.path.exists(os.path.join(cache, ".locks", "models--owner--repo", etag + ".lock")), name
    blobs.add(etag)
assert set(os.listdir(os.path.join(repo, "blobs"))) == blobs, "stray blobs (.incomplete?)"
assert open(os.path.join(cache, "CACHEDIR.TAG")).read().startswith("Signature: 8a477f597d28d172789f06886806bc55\n")
PY
stats > stats1.json
python3 - stats1.json <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
gets = [r for r in s["requests"] if r["method"] == "GET" and (r["path"].startswith("/cdn/") or "/resolve/" in r["path"])]
paths = [r["path"] for r in gets]
assert len(paths) == len(set(paths)), "a file was fetched twice: %s" % paths
assert any(p.startswith("/cdn/") for p in paths), "no LFS download through the CDN host"
assert s["cdn_with_authorization"] == 0, "the token went to the CDN host"
for r in s["requests"]:
    if r["path"].startswith("/cdn/"):
        assert r["host"].startswith("localhost:") and r["authorization"] is None, r
    else:
        assert r["authorization"] == "Bearer hf_e2e_secret_7f3a9c", r
assert sum(1 for r in s["requests"] if "/tree/" in r["path"]) >= 2, "the listing was not paginated"
PY

# --- Cached: a second resolution fetches no file; then the other commands take specs too.
reset_hub
[ "$(eval_loss hf://owner/repo/sub)" = "$local_loss" ] || fail "cached eval differs"
stats | python3 -c "
import json, sys
s = json.load(sys.stdin)
assert not [r for r in s['requests'] if r['method'] in ('GET', 'HEAD') and ('/resolve/' in r['path'] or r['path'].startswith('/cdn/'))], s['counts']"
"$STRATA_BIN" convert --from hf://owner/repo@main/sub --to-hf converted >convert.log 2>&1 || { cat convert.log; fail "convert from a spec"; }
cmp converted/config.json "$export_dir"/config.json || fail "converted config.json differs"
"$STRATA_BIN" generate --from hf://owner/repo/sub --prompt "The" --max-new-tokens 4 --temperature 0 >gen.out 2>gen.err ||
  { cat gen.out gen.err; fail "generate from a spec"; }
[ "$(wc -l < gen.out)" -eq 1 ] || { cat gen.out; fail "generate printed more than its text on stdout"; }
# A renamed repo (relative 307) and another revision.
[ "$(eval_loss hf://old/name/sub)" = "$local_loss" ] || fail "renamed repo"
[ "$(eval_loss hf://owner/repo/sub@v1)" = "$local_loss" ] || fail "revision v1"
[ -f "$HF_HUB_CACHE/models--owner--repo/refs/v1" ] || fail "no refs/v1"
# A Strata checkpoint folder on the Hub: its `latest` step only.
ckpt_loss=$(eval_loss run/checkpoints)
[ "$(eval_loss hf://owner/repo/ckpt)" = "$ckpt_loss" ] || fail "checkpoint folder from the Hub"
latest=$(cat repo/ckpt/latest)
[ "$(ls "$HF_HUB_CACHE/models--owner--repo/snapshots/$commit/ckpt")" = "$(printf 'latest\n%s' "$latest")" ] ||
  fail "expected only latest and $latest in the cached ckpt folder: $(ls "$HF_HUB_CACHE/models--owner--repo/snapshots/$commit/ckpt")"

# --- Training from the Hub ("Done when"): no model keys, the shape comes from config.json.
sed '/^model:/d' job.yaml > hubjob.yaml
"$STRATA_BIN" train --config hubjob.yaml --set job.run_dir=hubrun --set checkpoint.resume_path=hf://owner/repo/sub@main \
  --set training.steps=2 >hubrun.log 2>&1 || { cat hubrun.log; fail "train from hf:// failed"; }
grep -q "model: from .*/snapshots/$commit/sub/config.json" hubrun.log || { cat hubrun.log; fail "model shape not from config.json"; }
grep -q "resume: loaded model from .*snapshots/$commit/sub because checkpoint.resume_path hf://owner/repo/sub@main" hubrun.log ||
  { cat hubrun.log; fail "not resumed from the spec"; }

# --- Offline: the server stopped, HF_HUB_OFFLINE=1, then without it (Hub unreachable).
stop_hub
[ "$(HF_HUB_OFFLINE=1 eval_loss hf://owner/repo/sub@main)" = "$local_loss" ] || fail "offline eval differs"
HF_HUB_OFFLINE=1 "$STRATA_BIN" train --config hubjob.yaml --set job.run_dir=offrun \
  --set checkpoint.resume_path=hf://owner/repo/sub@main --set training.steps=2 >offrun.log 2>&1 ||
  { cat offrun.log; fail "offline train failed"; }
[ "$(eval_loss hf://owner/repo/sub@main down.log)" = "$local_loss" ] || fail "eval with the Hub down"
grep -q "WARNING: cannot resolve Hub spec 'hf://owner/repo/sub@main'.*using the cached snapshot" down.log ||
  { cat down.log; fail "no warning when the Hub is down"; }
HF_HUB_OFFLINE=1 expect_error "Hub spec 'hf://owner/repo/sub@v2' (repo owner/repo, subfolder sub, revision v2) is not available: HF_HUB_OFFLINE is set, and it is not in the cache" \
  "$STRATA_BIN" eval --from hf://owner/repo/sub@v2 --data "data/val_*.bin"
grep -qF "refs/v2 (the revision has never been downloaded)" out.txt || { cat out.txt; fail "offline: what is missing"; }
grep -qF "HINT: run once with network access" out.txt || { cat out.txt; fail "offline: no hint"; }
rm "$HF_HUB_CACHE/models--owner--repo/snapshots/$commit/sub/tokenizer.model" "$HF_HUB_CACHE"/models--owner--repo/snapshots/$commit/sub/model-00001-*
HF_HUB_OFFLINE=1 expect_error "is incomplete:" "$STRATA_BIN" eval --from hf://owner/repo/sub --data "data/val_*.bin"
grep -qF "missing: $HF_HUB_CACHE/models--owner--repo/snapshots/$commit/sub/model-00001-of-" out.txt || { cat out.txt; fail "missing shard not named"; }
start_hub

# --- A download interrupted mid-file resumes with Range (same process), and a partial file
# left by a killed process is continued (next process).
export HF_HUB_CACHE="$work/cache2"
shard=$(ls repo/sub/model-00001-*.safetensors | xargs basename)
sha=$(sha256sum "repo/sub/$shard" | cut -d' ' -f1)
control "{\"interrupt\": [{\"match\": \"/cdn/$sha\", \"after_bytes\": 5000, \"count\": 1}]}"
[ "$(eval_loss hf://owner/repo/sub interrupted.log)" = "$local_loss" ] || fail "eval after an interrupted download"
stats | python3 -c "
import json, sys
s = json.load(sys.stdin)
r = [r['range'] for r in s['requests'] if r['path'] == '/cdn/$sha']
assert r == [None, 'bytes=5000-'], r"
grep -q "retrying from byte 5000" interrupted.log || { cat interrupted.log; fail "no retry line"; }
export HF_HUB_CACHE="$work/cache3"
reset_hub
mkdir -p "$HF_HUB_CACHE/models--owner--repo/blobs"
head -c 3000 "repo/sub/$shard" > "$HF_HUB_CACHE/models--owner--repo/blobs/$sha.incomplete"
[ "$(eval_loss hf://owner/repo/sub partial.log)" = "$local_loss" ] || fail "eval after a partial download"
grep -q "$shard: resuming a partial download at 2.9 KiB" partial.log || { cat partial.log; fail "no resume line"; }
stats | python3 -c "
import json, sys
s = json.load(sys.stdin)
r = [r['range'] for r in s['requests'] if r['path'] == '/cdn/$sha']
assert r == ['bytes=3000-'], r"
# A slow download prints progress lines: bytes, rate, ETA.
export HF_HUB_CACHE="$work/cache-slow"
control "{\"slow\": [{\"match\": \"/cdn/$sha\", \"bytes_per_second\": 15000}]}"
[ "$(eval_loss hf://owner/repo/sub slow.log)" = "$local_loss" ] || fail "eval after a slow download"
grep -qE "hub: sub/$shard: [0-9.]+ KiB of 50.1 KiB \([0-9]+%\), [0-9.]+ KiB/s, ETA [0-9]+ s" slow.log ||
  { cat slow.log; fail "no progress line"; }
control '{}'
# A corrupted partial file fails the content check and is removed.
export HF_HUB_CACHE="$work/cache4"
mkdir -p "$HF_HUB_CACHE/models--owner--repo/blobs"
head -c 3000 /dev/zero > "$HF_HUB_CACHE/models--owner--repo/blobs/$sha.incomplete"
expect_error "does not match its etag $sha" "$STRATA_BIN" eval --from hf://owner/repo/sub --data "data/val_*.bin"
[ ! -e "$HF_HUB_CACHE/models--owner--repo/blobs/$sha.incomplete" ] || fail "corrupt partial file left behind"
# Transient 500s are retried.
export HF_HUB_CACHE="$work/cache5"
control '{"fail": [{"match": "/revision/", "status": 500, "count": 2}]}'
[ "$(eval_loss hf://owner/repo/sub)" = "$local_loss" ] || fail "eval after two 500s"

# --- Errors, each with its message (fresh caches, so the cache cannot answer).
export HF_HUB_CACHE="$work/cache-errors"
check_error() {  # EXPECTED SPEC
  expect_error "$1" "$STRATA_BIN" eval --from "$2" --data "data/val_*.bin"
  grep -qF "$token" out.txt && fail "the token appears in the output"
  cat out.txt >> errors.log
}
control '{}'
HF_TOKEN="" check_error "cannot resolve Hub spec 'hf://owner/repo/sub' (repo owner/repo, subfolder sub, revision main) from $HF_ENDPOINT: HTTP 401 (RepoNotFound: Repository not found) for GET $HF_ENDPOINT/api/models/owner/repo/revision/main" hf://owner/repo/sub
grep -qF "HINT: no token is set; for a private or gated repo set HF_TOKEN" out.txt || { cat out.txt; fail "401: no token hint"; }
HF_TOKEN=hf_wrong check_error "HTTP 401 (Invalid credentials in Authorization header)" hf://owner/repo/sub
grep -qF "the token from HF_TOKEN was sent" out.txt || { cat out.txt; fail "401: token source"; }
control '{"fail": [{"match": "/revision/", "status": 403, "error_code": "GatedRepo", "message": "Access to model owner/repo is restricted"}]}'
check_error "HTTP 403 (GatedRepo: Access to model owner/repo is restricted)" hf://owner/repo/sub
grep -qF "accept the repo's terms" out.txt || { cat out.txt; fail "403: no gated hint"; }
control '{}'
check_error "HTTP 404 (RepoNotFound: Repository not found) for GET $HF_ENDPOINT/api/models/owner/nope/revision/main" hf://owner/nope
check_error "HTTP 404 (RevisionNotFound: Invalid rev id: nobranch)" hf://owner/repo/sub@nobranch
grep -qF "HINT: check the revision 'nobranch'" out.txt || { cat out.txt; fail "no revision hint"; }
check_error "subfolder missing does not exist at commit $commit" hf://owner/repo/missing
check_error "the repo has no loadable file (*.safetensors, *.json, tokenizer files) at its top level" hf://owner/repo
check_error "the downloaded files do not form a model Strata can load" hf://owner/repo/other
control '{"fail": [{"match": "/revision/", "status": 503}]}'
check_error "HTTP 503" hf://owner/repo/sub
grep -qF "(gave up after 3 attempts)" out.txt || { cat out.txt; fail "503: attempts not reported"; }
grep -qF "HINT: the Hub at $HF_ENDPOINT could not be reached" out.txt || { cat out.txt; fail "503: no hint"; }
control '{}'
check_error "Hub spec 'hf://owner/repo/../x': path segment '..' is not allowed" hf://owner/repo/../x
HF_ENDPOINT="http://127.0.0.1:1" check_error "GET http://127.0.0.1:1/api/models/owner/repo/revision/main failed: " hf://owner/repo/sub
grep -qi "connect" out.txt || { cat out.txt; fail "connection refused not reported"; }

# --- Hostile servers (each case takes seconds).
# A server or proxy that echoes the Authorization header: the token is redacted wherever the
# server's text reaches a message (X-Error-Message, a body excerpt, a redirect's Location).
canary=hf_canary_Zq7Lm2Xw9
for via in message body redirect; do
  export HF_HUB_CACHE="$work/cache-echo-$via"
  control "{\"echo_auth\": [{\"match\": \"/revision/\", \"via\": \"$via\"}]}"
  if HF_TOKEN=$canary "$STRATA_BIN" eval --from hf://owner/repo/sub --data "data/val_*.bin" >echo.out 2>echo.err; then
    cat echo.out echo.err; fail "echo_auth $via: expected a failure"
  fi
  if grep -rlF "$canary" "$work" --exclude=hub.jsonl; then
    cat echo.out echo.err; fail "echo_auth $via: the token was printed or written"
  fi
  case $via in
    message) expected="HTTP 401 (Invalid credentials in Authorization header (got Authorization: Bearer <redacted>)) for GET $HF_ENDPOINT/api/models/owner/repo/revision/main" ;;
    body) expected="HTTP 401 (proxy error: request refused (Authorization: Bearer <redacted>)) for GET $HF_ENDPOINT/api/models/owner/repo/revision/main" ;;
    redirect) expected="HTTP 404 (Not found) for GET $HF_ENDPOINT/_echo/Bearer%20<redacted>" ;;
  esac
  grep -qF "cannot resolve Hub spec 'hf://owner/repo/sub' (repo owner/repo, subfolder sub, revision main) from $HF_ENDPOINT: $expected" echo.err ||
    { cat echo.out echo.err; fail "echo_auth $via: message"; }
done
# A listing whose Link rel="next" names the page itself, or leads back to the first page.
export HF_HUB_CACHE="$work/cache-loop"
control '{"link_cycle": [{"match": "/tree/", "to": "self"}]}'
check_error "the file listing of owner/repo at commit $commit does not end: after 1 page, its Link rel=\"next\" leads back to $HF_ENDPOINT/api/models/owner/repo/tree/$commit/sub?recursive=true&expand=false, a page already fetched" hf://owner/repo/sub
grep -qF "HINT: the server at $HF_ENDPOINT does not answer as the Hub does" out.txt || { cat out.txt; fail "link cycle: no hint"; }
control '{"link_cycle": [{"match": "/tree/", "to": "first"}]}'
check_error "the file listing of owner/repo at commit $commit does not end: after" hf://owner/repo/sub
grep -qE "after [2-9] pages, its Link rel=\"next\" leads back to $HF_ENDPOINT/api/models/owner/repo/tree/$commit/sub\?recursive=true&expand=false, a page" out.txt ||
  { cat out.txt; fail "link cycle A -> B -> A"; }
# A file that stalls after a few bytes on every request, or whose every connection drops after a
# few bytes: each retry makes progress, so only the bounds of a file's download end it (the
# average rate, the deadline, the retries in all), each in seconds.
bounded() {  # EXPECTED ENV...: check_error with the environment given, in 15 s at most
  local expected=$1 started=$SECONDS; shift
  (export "$@"; check_error "$expected" hf://owner/repo/sub)
  [ $((SECONDS - started)) -le 15 ] || fail "bounded download took $((SECONDS - started)) s: $*"
}
control '{"stall": [{"match": "^/cdn/", "after_bytes": 100, "seconds": 30}]}'
bounded "was stopped because its average rate," HF_HUB_CACHE="$work/cache-stall1" \
  STRATA_HUB_MIN_RATE=1000 STRATA_HUB_MIN_RATE_AFTER=3 HF_HUB_DOWNLOAD_TIMEOUT=1
grep -qE "the download of sub/model-[0-9]+-of-[0-9]+\.safetensors was stopped because its average rate, [0-9.]+ B/s, is below the minimum of 1000 B/s \(STRATA_HUB_MIN_RATE\) that holds once a download has run 3 s \(STRATA_HUB_MIN_RATE_AFTER\): [0-9]+ B received in [0-9.]+ s over [0-9]+ attempts?, the file holds [0-9]+ B of 50.1 KiB" out.txt ||
  { cat out.txt; fail "stall: rate bound"; }
grep -qF "HINT: the server sends this file too slowly or keeps stalling" out.txt || { cat out.txt; fail "stall: no hint"; }
bounded "was stopped because it ran past the deadline of 2 s per file (STRATA_HUB_FILE_DEADLINE): 100 B received in 2." \
  HF_HUB_CACHE="$work/cache-stall2" STRATA_HUB_MIN_RATE=0 STRATA_HUB_FILE_DEADLINE=2 HF_HUB_DOWNLOAD_TIMEOUT=10
control '{"interrupt": [{"match": "^/cdn/", "after_bytes": 100}]}'
bounded "was stopped because it needed more than 2 retries (STRATA_HUB_MAX_RETRIES): 300 B received in" \
  HF_HUB_CACHE="$work/cache-stall3" STRATA_HUB_MAX_RETRIES=2
grep -qF "over 3 attempts, the file holds 300 B of 50.1 KiB (last attempt: " out.txt || { cat out.txt; fail "retry bound"; }
# A listing that names files outside the repo: refused, nothing written anywhere for them.
rm -f /tmp/strata-escape.json
touch marker
for entry in ../escape.json sub/../../escape.json /tmp/strata-escape.json 'sub/%2e%2e/%2e%2e/escape.json' 'sub/%2E%2E%2Fescape.json'; do
  export HF_HUB_CACHE="$work/cache-entry"
  control "{\"extra_entry\": [{\"match\": \"/tree/\", \"path\": \"$entry\"}]}"
  check_error "the file listing of owner/repo at commit $commit names the entry '$entry', which is no path inside the repo (" hf://owner/repo/sub
done
[ ! -e /tmp/strata-escape.json ] || fail "a listing entry was written to /tmp"
written=$(find "$work" -newer marker \( -type f -o -type l \) ! -name out.txt ! -name errors.log ! -name hub.jsonl ! -path "$work/cache-entry/*")
[ -z "$written" ] || fail "written outside the cache: $written"
[ -z "$(find "$work" -name '*escape*')" ] || fail "an escaping entry was written: $(find "$work" -name '*escape*')"
control '{}'
# A spec too long for any file name: the spec's own message, not the file system's.
check_error "repo id part 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...' is 4993 characters long; the Hub allows at most 96" "hf://owner/$(head -c 4993 /dev/zero | tr '\0' a)"

# --- 4 ranks on one node: one download of each file; one failure stops every rank alike.
export HF_HUB_CACHE="$work/cache-ranks"
reset_hub
timeout 300 mpirun --oversubscribe -np 4 "$STRATA_BIN" train --config hubjob.yaml --set job.run_dir=np4 \
  --set checkpoint.resume_path=hf://owner/repo/sub@main --set training.steps=2 --set training.global_batch_size=8 >np4.log 2>&1 ||
  { cat np4.log; fail "4-rank train from hf:// failed"; }
stats | python3 -c "
import json, sys
c = json.load(sys.stdin)['counts']
files = [k for k in c if k.split(' ', 1)[1].startswith('/cdn/') or '/resolve/' in k]
assert len(files) >= 4, c
for k in files:
    assert c[k] == 1, (k, c[k])  # one HEAD and one GET per file, for all 4 ranks
assert c['GET /api/models/owner/repo/revision/main'] == 1, c"
export HF_HUB_CACHE="$work/cache-ranks-fail"
control "{\"fail\": [{\"match\": \"/resolve/.*/$shard\", \"status\": 403, \"error_code\": \"GatedRepo\", \"message\": \"Access to model owner/repo is restricted\"}]}"
rc=0
timeout 300 mpirun --oversubscribe -np 4 "$STRATA_BIN" train --config hubjob.yaml --set job.run_dir=np4fail \
  --set checkpoint.resume_path=hf://owner/repo/sub@main --set training.steps=2 --set training.global_batch_size=8 >np4fail.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] || { cat np4fail.log; fail "4-rank train should fail"; }
[ "$rc" -ne 124 ] || { cat np4fail.log; fail "4-rank failure hung"; }
python3 - np4fail.log <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
firsts = {}
for i, line in enumerate(lines):
    m = re.match(r"\[rank (\d)\] error: (.*)", line)
    if m:
        firsts[m.group(1)] = m.group(2)
assert sorted(firsts) == ["0", "1", "2", "3"], (firsts, lines)
assert len(set(firsts.values())) == 1, firsts
assert "HTTP 403 (GatedRepo: Access to model owner/repo is restricted)" in firsts["0"], firsts["0"]
PY
grep -qF "(on rank 0, which downloaded for node 0 (" np4fail.log || { cat np4fail.log; fail "failing rank not named"; }

# --- The token never reaches logs, metrics, checkpoints or the cache.
if grep -rlF "$token" "$work" --exclude=hub.jsonl --exclude=stats1.json; then
  fail "the token was written somewhere"
fi
echo "hub: ok"
