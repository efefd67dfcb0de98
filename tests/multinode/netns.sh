#!/usr/bin/env bash
# Multi-node runs without a cluster: two fake nodes n1 and n2 (network namespaces on a bridge,
# own hostnames; tests/multinode/lib/netns_nodes.sh) and a fake Hub on a third, with
# `mpirun --host n1:2,n2:2 -np 4`. Checks, on 2 nodes x 2 ranks:
#   - the start-up report names both nodes, their hosts and every rank's local rank;
#   - training gives the single-process loss curve (1e-5 relative, as data_parallel.sh), with
#     the collectives crossing the veth links;
#   - a checkpoint written into a folder both nodes share resumes on 1 node x 3 ranks, on the
#     other node, and continues the same curve;
#   - hybrid sharding (shard_group_size: node) gives the same curve, and the bytes that cross
#     the veth links per step are at most 0.4 of FSDP's over the world (both keeping
#     activations, 3 micro-batches per step);
#   - a Hub spec is resolved by one rank per node (fake Hub request counts per client address):
#     with a shared cache each file is fetched once; when one node's download fails, every
#     rank fails with the same message naming that node;
#   - with node-private scratch storage (`unshare --mount`) for HF_HOME, each node fills its
#     own cache, fetching each file once.
# Exits 77 (skipped) where network namespaces are not permitted.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${STRATA_SOURCE_DIR:=$(cd "$here/../.." && pwd)}"
source "$here/../e2e/lib/common.sh"  # cd's into a fresh work dir
source "$here/lib/netns_nodes.sh"
started=$(date +%s)

netns_setup n1 n2
# Nothing on the test network goes through a proxy.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HUGGING_FACE_HUB_TOKEN HF_TOKEN_PATH HF_HUB_DISABLE_IMPLICIT_TOKEN \
  HF_HUB_CACHE HF_HOME STRATA_NETNS_PRIVATE

"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null
cat > job.yaml <<YAML
job: {name: multinode, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 8, global_batch_size: 12, micro_batch_size: 1, eval_interval: 0, log_interval: 1}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 4, hf_max_shard_size: 40KB}
YAML

# losses_match REFERENCE RUN [FIRST_STEP]: RUN's per-step losses equal REFERENCE's from
# FIRST_STEP on (same steps, 1e-5 relative).
losses_match() {
  python3 - "$1" "$2" "${3:-1}" <<'PY'
import json, sys
ref_dir, run_dir, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in r}
ref = {s: l for s, l in losses(ref_dir).items() if s >= first}
got = losses(run_dir)
if sorted(got) != sorted(ref) or not got:
    sys.exit("FAIL: %s logged steps %s, %s steps %s" % (run_dir, sorted(got), ref_dir, sorted(ref)))
for step in sorted(ref):
    if abs(got[step] - ref[step]) > 1e-5 * abs(ref[step]):
        sys.exit("FAIL: %s step %d loss %r vs %s %r" % (run_dir, step, got[step], ref_dir, ref[step]))
print("%s: steps %d-%d match %s (max rel diff %.1e)" % (run_dir, min(ref), max(ref), ref_dir,
      max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)))
PY
}
# world_line LOG: the start-up report's layout line.
world_line() { grep -m1 '^world: ' "$1" || { cat "$1"; fail "no world line in $1"; }; }
expect_world() {  # LOG EXPECTED
  [ "$(world_line "$1")" = "$2" ] || fail "start-up report in $1:
  got:      $(world_line "$1")
  expected: $2"
}

# --- 1 process, for reference.
"$STRATA_BIN" train --config job.yaml --set job.run_dir=one >one.log 2>&1 || { cat one.log; fail "1-process run failed"; }

# --- 2 nodes x 2 ranks: layout, loss curve, traffic between the nodes, shared checkpoints.
before=$(( $(link_bytes n1) + $(link_bytes n2) ))
node_mpirun --host n1:2,n2:2 -np 4 "$STRATA_BIN" train --config job.yaml --set job.run_dir=shared/run4 \
  >run4.log 2>&1 || { cat run4.log; fail "2x2 run failed"; }
traffic=$(( $(link_bytes n1) + $(link_bytes n2) - before ))
expect_world run4.log "world: world 4 rank(s) on 2 node(s) [n1, n2]; rank 0 is local rank 0/2 on n1; ranks by node: n1 = 0-1 (local 0-1), n2 = 2-3 (local 0-1); 1 intra-op thread(s) per rank"
losses_match one shared/run4
# Each step all-gathers and reduce-scatters every unit across the nodes: well over 1 MB in all.
[ "$traffic" -gt 1000000 ] || fail "only $traffic bytes crossed the veth links"
echo "2x2: $traffic bytes between the nodes"
python3 - shared/run4/checkpoints/step-0000004 <<'PY'
import json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "metadata.json")))
assert m["world_size"] == 4 and not m["model_only"], (m["world_size"], m["model_only"])
assert sorted(m["files"]) == ["rank-%05d.safetensors" % r for r in range(4)], sorted(m["files"])
for f in m["files"]:
    assert os.path.getsize(os.path.join(d, f)) == m["files"][f]["size"], f
PY

# --- The shared checkpoint resumes on 1 node x 3 ranks (n2, which wrote half of it).
node_mpirun --host n2:3 -np 3 "$STRATA_BIN" train --config job.yaml --set job.run_dir=shared/run3 \
  --set checkpoint.resume_path=shared/run4/checkpoints/step-0000004 >run3.log 2>&1 ||
  { cat run3.log; fail "1x3 resume failed"; }
expect_world run3.log "world: world 3 rank(s) on 1 node(s) [n2]; rank 0 is local rank 0/3 on n2; ranks by node: n2 = 0-2 (local 0-2); 1 intra-op thread(s) per rank"
grep -q "resume: loaded model, optimizer, lr_scheduler, dataloader, rng from shared/run4/checkpoints/step-0000004 (step 4)" run3.log ||
  { cat run3.log; fail "1x3 did not resume from the 2x2 checkpoint"; }
grep -q "training continues at step 5" run3.log || { cat run3.log; fail "1x3 did not continue at step 5"; }
losses_match one shared/run3 5
losses_match shared/run4 shared/run3 5

# --- Hybrid sharding: shard groups of one node (n1 = 0-1, n2 = 2-3), replica groups {0,2} and
# {1,3}. Per step, FSDP over the world all-gathers and reduce-scatters every unit across the
# nodes for each of the A = 3 micro-batches; HSDP keeps those inside the nodes and all-reduces
# each gradient shard across them once. Bytes sent by a node = rx on the bridge side of its link.
sent_bytes() { cat "/sys/class/net/${NETNS_NODE_LINK[$1]}/statistics/rx_bytes"; }
declare -A crossed
for mode in world node; do
  before=$(( $(sent_bytes n1) + $(sent_bytes n2) ))
  node_mpirun --host n1:2,n2:2 -np 4 "$STRATA_BIN" train --config job.yaml --set job.run_dir="bytes_$mode" \
    --set parallel.fsdp.shard_group_size=$mode --set parallel.fsdp.activation_checkpointing=none \
    --set checkpoint.enable=false >"bytes_$mode.log" 2>&1 || { cat "bytes_$mode.log"; fail "2x2 $mode run failed"; }
  crossed[$mode]=$(( $(sent_bytes n1) + $(sent_bytes n2) - before ))
  losses_match one "bytes_$mode"
done
grep -qF "shard groups [0-1] on n1, [2-3] on n2; replica groups (gradient shards averaged once per step) [0,2], [1,3]" bytes_node.log ||
  { cat bytes_node.log; fail "no hybrid layout in the start-up report"; }
python3 - "${crossed[world]}" "${crossed[node]}" <<'PY'
import json, re, sys
fsdp, hsdp = int(sys.argv[1]), int(sys.argv[2])
steps, accumulation = 8, 3
def report(name):
    log = open(name + ".log").read()
    elements = sum(int(n) for n in re.findall(r"unit \S+: (\d+) elements", log))
    memory = re.search(r"^memory per rank \(.*", log, re.M).group(0)
    rows = [json.loads(l) for l in open(name + "/metrics.jsonl") if '"loss"' in l]
    return elements, memory, rows[-1]["comm_mb_shard"], rows[-1]["comm_mb_replica"]
P = 4 * report("bytes_world")[0]  # parameter bytes (fp32)
# Ring theory, bytes crossing between the 2 nodes (both directions) per step. FSDP: a ring over
# the 4 ranks has 2 cross-node edges, each carrying 3/4 of the tensor per all-gather or
# reduce-scatter: 1.5 P per collective, 2 per micro-batch. HSDP: each of the 2 replica pairs
# all-reduces a P/2 shard, each rank sending half of it twice: P per pair, 2 P in all, once per
# step.
theory_fsdp, theory_hsdp = accumulation * 2 * 1.5 * P, 2 * P
for mode, name, measured, theory in (("fsdp (world)", "bytes_world", fsdp, theory_fsdp),
                                     ("hsdp (node)", "bytes_node", hsdp, theory_hsdp)):
    _, memory, shard, replica = report(name)
    print("%-12s cross-node %8.0f bytes/step measured, %8.0f theory (P = %d bytes); metrics "
          "per rank: comm_mb_shard %.3f, comm_mb_replica %.3f; %s" % (
              mode, measured / steps, theory, P, shard, replica, memory))
ratio = hsdp / fsdp
print("hsdp/fsdp cross-node bytes: %.3f measured, %.3f theory (limit 0.4)" % (ratio, theory_hsdp / theory_fsdp))
assert ratio <= 0.4, ratio
PY

# --- The fake Hub on its own namespace, serving the 1-process run's (sharded) export.
mkdir repo
cp one/checkpoints/hf-0000008/* repo/
[ "$(ls repo/*.safetensors | wc -l)" -ge 2 ] || fail "expected a sharded export"
token=hf_multinode_7c1e
ip netns exec "$HUB_NS" python3 "$STRATA_SOURCE_DIR/tests/fixtures/fake_hub.py" --host 0.0.0.0 \
  --cdn-host "$CDN_IP" --repo owner/repo=repo --token "$token" --port-file port --log hub.jsonl &
for _ in $(seq 100); do [ -s port ] && break; sleep 0.1; done
[ -s port ] || fail "the fake Hub did not start"
port=$(cat port)
export HF_ENDPOINT="http://$HUB_IP:$port" HF_TOKEN="$token" STRATA_HUB_ATTEMPTS=2 HF_HUB_DOWNLOAD_TIMEOUT=10
# The Hub answers from this namespace and from a node, on both its addresses.
curl -sf "$HF_ENDPOINT/_stats" >/dev/null || fail "the fake Hub is not reachable at $HF_ENDPOINT"
in_node n2 curl -sf "http://$CDN_IP:$port/_stats" >/dev/null || fail "n2 cannot reach the Hub at $CDN_IP"
control() { curl -sf -X POST --data "$1" "$HF_ENDPOINT/_control" >/dev/null; }
reset_hub() { curl -sf -X POST "$HF_ENDPOINT/_reset" >/dev/null; }
stats() { curl -sf "$HF_ENDPOINT/_stats"; }
sed '/^model:/d' job.yaml > hubjob.yaml
hub_train() {  # RUN_DIR [mpirun options...]: 2x2 (default) training from hf://owner/repo, 2 steps
  local dir=$1; shift
  node_mpirun --host n1:2,n2:2 -np 4 "$@" "$STRATA_BIN" train --config hubjob.yaml --set job.run_dir="$dir" \
    --set checkpoint.resume_path=hf://owner/repo@main --set training.steps=2 --set checkpoint.interval=100
}
# check_fetches STATS_FILE PER_NODE: each node's revision request once; each file's content GET
# (resolve, or the CDN for LFS files) once per node when PER_NODE=1, once in all otherwise.
check_fetches() {
  python3 - "$1" "$2" "${NETNS_NODE_IP[n1]}" "${NETNS_NODE_IP[n2]}" "$CDN_IP:$port" repo <<'PY'
import collections, json, os, sys
stats, per_node, nodes, cdn, repo = (json.load(open(sys.argv[1])), sys.argv[2] == "1",
                                     sys.argv[3:5], sys.argv[5], sys.argv[6])
reqs = stats["requests"]
assert {r["client"] for r in reqs} == set(nodes), ("requests from", {r["client"] for r in reqs})
rev = collections.Counter(r["client"] for r in reqs if "/revision/" in r["path"])
assert rev == {n: 1 for n in nodes}, ("revision requests per node", rev)
# (file name or CDN sha256, client) -> content GETs
gets = collections.Counter((r["path"].split("/")[-1], r["client"]) for r in reqs
                           if r["method"] == "GET" and ("/resolve/" in r["path"] or r["path"].startswith("/cdn/")))
per_file = collections.Counter(name for name, _ in gets.elements())
files = [f for f in os.listdir(repo) if f.endswith((".json", ".safetensors", ".model", ".yaml", ".txt"))]
assert len(per_file) == len(files), ("files fetched", sorted(per_file), "in the repo", sorted(files))
for name, client in gets:
    assert gets[(name, client)] == 1, ("fetched twice by one node", name, client)
for name, n in per_file.items():
    assert n == (2 if per_node else 1), ("fetches of", name, n, gets)
for r in reqs:
    if r["path"].startswith("/cdn/"):
        assert r["host"] == cdn and r["authorization"] is None, r
assert stats["cdn_with_authorization"] == 0
print("hub: %d files, fetched %s; revision requests %s" % (
    len(per_file), "once per node" if per_node else "once in all", dict(rev)))
PY
}

# --- A shared cache: one resolution per node, each file fetched once (the blob locks). Ranks
# are placed round-robin here (n1 has ranks 0 and 2, n2 has 1 and 3).
export HF_HUB_CACHE="$PWD/shared/hf-cache"
hub_train hub4 --map-by node >hub4.log 2>&1 || { cat hub4.log; fail "2x2 training from the Hub failed"; }
expect_world hub4.log "world: world 4 rank(s) on 2 node(s) [n1, n2]; rank 0 is local rank 0/2 on n1; ranks by node: n1 = 0,2 (local 0-1), n2 = 1,3 (local 0-1); 1 intra-op thread(s) per rank"
grep -q "resume: loaded model from .*/shared/hf-cache/models--owner--repo/snapshots/.* because checkpoint.resume_path hf://owner/repo@main" hub4.log ||
  { cat hub4.log; fail "2x2 did not load from the Hub"; }
stats > stats-shared.json
check_fetches stats-shared.json 0

# --- One node's download fails: every rank fails with the same message, naming that node
# (round-robin placement again: n2's downloader is rank 1). n2's revision request is refused.
export HF_HUB_CACHE="$PWD/shared/hf-cache-fail"
reset_hub
control "{\"fail\": [{\"match\": \"/revision/\", \"client\": \"^${NETNS_NODE_IP[n2]//./[.]}\$\", \"status\": 403,
  \"error_code\": \"GatedRepo\", \"message\": \"Access to model owner/repo is restricted\"}]}"
rc=0
hub_train hubfail --map-by node >hubfail.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] || { cat hubfail.log; fail "training should fail when n2's download fails"; }
[ "$rc" -ne 124 ] || { cat hubfail.log; fail "the failure on one node hung the job"; }
python3 - hubfail.log <<'PY'
import re, sys
firsts = {}
for line in open(sys.argv[1]).read().splitlines():
    m = re.match(r"\[rank (\d)\] error: (.*)", line)
    if m and m.group(1) not in firsts:
        firsts[m.group(1)] = m.group(2)
assert sorted(firsts) == ["0", "1", "2", "3"], firsts
assert len(set(firsts.values())) == 1, firsts
for part in ("HTTP 403 (GatedRepo: Access to model owner/repo is restricted)",
             "(on rank 1, which downloaded for node 1 (n2); every rank stops)"):
    assert part in firsts["0"], (part, firsts["0"])
print("one node failing: every rank reports:", firsts["0"][:160], "...")
PY
stats | python3 -c "
import json, sys
by_client = {(r['client'], r['status']) for r in json.load(sys.stdin)['requests'] if '/revision/' in r['path']}
assert by_client == {('${NETNS_NODE_IP[n1]}', 200), ('${NETNS_NODE_IP[n2]}', 403)}, by_client"

# --- Node-local scratch: HF_HOME is the same path on every node, but each node's mount
# namespace binds its own directory there (nodes/n1, nodes/n2); each node fills its cache.
unset HF_HUB_CACHE
export HF_HOME="$PWD/scratch/hf"
mkdir -p scratch nodes/n1 nodes/n2
reset_hub
STRATA_NETNS_PRIVATE="$PWD/scratch=$PWD/nodes" hub_train hubpriv >hubpriv.log 2>&1 ||
  { cat hubpriv.log; fail "2x2 training with node-private HF_HOME failed"; }
[ -z "$(ls -A scratch)" ] || fail "the shared mount point got files: $(ls -A scratch)"
stats > stats-private.json
check_fetches stats-private.json 1
commit=$(python3 -c "
import json; print(next(r for r in json.load(open('stats-private.json'))['requests'] if '/resolve/' in r['path'])['path'].split('/')[4])")
for node in n1 n2; do
  snap="nodes/$node/hf/hub/models--owner--repo/snapshots/$commit"
  [ -d "$snap" ] || fail "$node has no snapshot $commit in its own cache: $(find "nodes/$node" | head)"
  for f in repo/*; do
    case $f in *.json | *.safetensors | *.model | *.yaml | *.txt) cmp "$f" "$snap/$(basename "$f")" || fail "$node: $(basename "$f") differs" ;; esac
  done
  [ -z "$(find "nodes/$node/hf/hub/models--owner--repo/blobs" -name '*.incomplete')" ] || fail "$node: incomplete blobs"
done
echo "node-private HF_HOME: n1 and n2 each hold a complete snapshot $commit"

# --- The token went to the Hub's API address only.
if grep -rlF "$token" . --exclude=hub.jsonl --exclude='stats-*.json'; then fail "the token was written somewhere"; fi
echo "multinode: all checks passed in $(( $(date +%s) - started )) s"
