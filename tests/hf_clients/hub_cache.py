#!/usr/bin/env python3
"""huggingface_hub <-> Strata through the Hugging Face cache, against the fake Hub
(tests/fixtures/fake_hub.py) as HF_ENDPOINT.

huggingface_hub -> Strata: snapshot_download (a branch, another branch, a pinned commit; the
subfolder through allow_patterns) fills HF_HOME/hub; Strata with HF_HUB_OFFLINE=1 then resolves
the same spec from that cache, loads the same weights, and makes no request (the fake Hub's
log does not grow).

Strata -> huggingface_hub: Strata downloads into an empty HF_HOME; scan_cache_dir() reports the
repo, its revisions, refs, files and sizes as they are on the Hub, with no warning, and
snapshot_download / hf_hub_download with local_files_only=True return Strata's snapshot.

A tokenizer alone (a Hub spec as --tokenizer): tokenizer files fetched by either client serve
the other, and Strata's download holds those files only."""

import hashlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402

work = hc.setup()
checks = hc.Checks()
data = hc.prepare_data()
val = f"{data}/val_000000.bin"

# What the Hub serves: a Strata export in sub/ of main (with a model card at the top, which a
# subfolder download must not fetch), and another training's export in sub/ of v1.
job = f"""job: {{name: publish, seed: 2}}
model: {{vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 64}}
data: {{train: "{data}/train_*.bin", tokenizer: {data}/tokenizer.model, seq_len: 64}}
training: {{steps: 4, global_batch_size: 4, micro_batch_size: 4, eval_interval: 0, log_interval: 4}}
parallel: {{threads_per_rank: 1}}
checkpoint: {{interval: 4, hf_max_shard_size: 40KB}}
"""
repos = {}
for rev, seed in (("main", 2), ("v1", 9)):
    hc.train(job, "publish", f"job.run_dir=pub_{rev}", f"job.seed={seed}")
    root = f"repo_{rev}"
    os.makedirs(f"{root}/sub")
    src = f"pub_{rev}/checkpoints/hf-latest"
    for f in os.listdir(src):
        with open(f"{src}/{f}", "rb") as a, open(f"{root}/sub/{f}", "wb") as b:
            b.write(a.read())
    with open(f"{root}/README.md", "w") as f:
        f.write(f"# owner/repo at {rev}\n")
    repos[rev] = root
local_loss = {rev: hc.strata_eval(f"{root}/sub", val, 64) for rev, root in repos.items()}
checks.true("the two revisions hold different models", local_loss["main"] != local_loss["v1"],
            f"{local_loss['main']!r} vs {local_loss['v1']!r}")

hub_log = os.path.join(work, "hub.jsonl")
hub = subprocess.Popen([sys.executable, os.path.join(hc.SOURCE, "tests", "fixtures", "fake_hub.py"),
                        "--repo", f"owner/repo={repos['main']}", "--repo", f"owner/repo@v1={repos['v1']}",
                        "--port-file", "port", "--log", hub_log, "--page-size", "4"])
try:
    for _ in range(100):
        if os.path.exists("port"):
            break
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{open('port').read().strip()}"
    # huggingface_hub reads these at import: online, against the fake Hub.
    os.environ["HF_ENDPOINT"] = endpoint
    os.environ.pop("HF_HUB_OFFLINE")
    os.environ.pop("TRANSFORMERS_OFFLINE")  # huggingface_hub reads it as HF_HUB_OFFLINE too
    (huggingface_hub,) = hc.require_libraries("huggingface_hub")
    from huggingface_hub import HfApi, hf_hub_download, scan_cache_dir, snapshot_download

    def requests():
        return sum(1 for _ in open(hub_log)) if os.path.exists(hub_log) else 0

    api = HfApi(endpoint=endpoint)
    commit = {rev: api.model_info("owner/repo", revision=rev).sha for rev in repos}
    hf_files = {rev: sorted(f.rfilename for f in api.model_info("owner/repo", revision=rev, files_metadata=True).siblings)
                for rev in repos}
    sizes = {rev: {f.rfilename: f.size for f in api.model_info("owner/repo", revision=rev, files_metadata=True).siblings}
             for rev in repos}

    # --- huggingface_hub fills the cache; Strata reads it offline.
    cache = os.path.join(os.environ["HF_HOME"], "hub")  # both clients derive it from HF_HOME
    cases = [("main", "main", "hf://owner/repo/sub@main"),
             ("v1", "v1", "hf://owner/repo@v1/sub"),
             (commit["v1"], "v1", f"hf://owner/repo/sub@{commit['v1']}")]
    for revision, rev, spec in cases:
        path = snapshot_download("owner/repo", revision=revision, allow_patterns=["sub/*"])
        checks.equal(f"snapshot_download(revision={revision[:12]}): snapshot", os.path.relpath(path, cache),
                     f"models--owner--repo/snapshots/{commit[rev]}")
        checks.equal(f"snapshot_download(revision={revision[:12]}): only the subfolder", sorted(os.listdir(path)), ["sub"])
        before = requests()
        loss = hc.strata_eval(spec, val, 64, env={"HF_HUB_OFFLINE": "1"})
        checks.close(f"Strata offline from huggingface_hub's cache, {spec}", loss, local_loss[rev], rtol=0.0)
        checks.equal(f"requests to the Hub while Strata resolved {spec} offline", requests() - before, 0)
    # The same specs also resolve online against that cache without downloading a file.
    before = requests()
    checks.close("Strata online, cached by huggingface_hub, hf://owner/repo/sub@main",
                 hc.strata_eval("hf://owner/repo/sub@main", val, 64), local_loss["main"], rtol=0.0)
    fetched = [json.loads(line) for line in open(hub_log)][before:]
    downloads = [r["path"] for r in fetched if "/resolve/" in r["path"] or r["path"].startswith("/cdn/")]
    checks.equal("files Strata fetched for a snapshot huggingface_hub already holds", downloads, [])

    # --- Strata fills an empty cache; huggingface_hub reads it.
    strata_home = os.path.join(work, "strata-home")
    strata_cache = os.path.join(strata_home, "hub")
    env = {"HF_HOME": strata_home}
    for spec, rev in (("hf://owner/repo/sub@main", "main"), ("hf://owner/repo/sub@v1", "v1")):
        checks.close(f"Strata download of {spec}", hc.strata_eval(spec, val, 64, env=env), local_loss[rev], rtol=0.0)
    info = scan_cache_dir(strata_cache)
    checks.equal("scan_cache_dir: warnings", [str(w) for w in info.warnings], [])
    checks.equal("scan_cache_dir: repos", [(r.repo_id, r.repo_type) for r in info.repos], [("owner/repo", "model")])
    (repo,) = info.repos
    revisions = {r.commit_hash: r for r in repo.revisions}
    checks.equal("scan_cache_dir: revisions", sorted(revisions), sorted(commit.values()))
    checks.equal("scan_cache_dir: refs", {ref: r.commit_hash for r in repo.revisions for ref in r.refs}, commit)
    for rev in repos:
        r = revisions[commit[rev]]
        got = {os.path.relpath(f.file_path, r.snapshot_path): f.size_on_disk for f in r.files}
        wanted = {f: s for f, s in sizes[rev].items() if f.startswith("sub/")}
        checks.equal(f"scan_cache_dir: files and sizes of {rev}", got, wanted, show=f"{len(got)} files")
        checks.equal(f"scan_cache_dir: size of {rev}", r.size_on_disk, sum(wanted.values()))
    blobs = {}  # a file the two revisions share is one blob
    for rev, root in repos.items():
        for f in os.listdir(f"{root}/sub"):
            content = open(f"{root}/sub/{f}", "rb").read()
            blobs[hashlib.sha256(content).hexdigest()] = len(content)
    checks.equal("scan_cache_dir: repo size (distinct blobs)", repo.size_on_disk, sum(blobs.values()),
                 show=f"{len(blobs)} blobs")
    before = requests()
    for rev in repos:
        path = snapshot_download("owner/repo", revision=rev, allow_patterns=["sub/*"], cache_dir=strata_cache,
                                 local_files_only=True)
        checks.equal(f"snapshot_download(local_files_only, revision={rev}) returns Strata's snapshot",
                     os.path.relpath(path, strata_cache), f"models--owner--repo/snapshots/{commit[rev]}")
        config = hf_hub_download("owner/repo", "sub/config.json", revision=rev, cache_dir=strata_cache,
                                 local_files_only=True)
        checks.equal(f"hf_hub_download(local_files_only, sub/config.json, {rev})",
                     open(config, "rb").read(), open(f"{repos[rev]}/sub/config.json", "rb").read(),
                     show=os.path.relpath(config, strata_cache))
    checks.equal("requests to the Hub during the local_files_only calls", requests() - before, 0)
    # huggingface_hub, online, finds every file of Strata's snapshot in place (no download).
    before = requests()
    snapshot_download("owner/repo", revision="main", allow_patterns=["sub/*"], cache_dir=strata_cache)
    fetched = [json.loads(line) for line in open(hub_log)][before:]
    downloads = [r["path"] for r in fetched if r["method"] == "GET" and ("/resolve/" in r["path"] or r["path"].startswith("/cdn/"))]
    checks.equal("files huggingface_hub downloaded again over Strata's snapshot", downloads, [])

    # --- A tokenizer alone, both ways: huggingface_hub fetches the tokenizer files (as Strata's
    # offline hint says) and Strata tokenizes from them offline; Strata fills an empty cache with
    # the tokenizer files alone, which scan_cache_dir reports.
    text = os.path.join(work, "tokenize.txt")
    with open(text, "w") as f:
        f.write("The quick brown fox jumps over the lazy dog.\n")
    tokenize = ["tokenize", "--input", text, "--add-special-tokens", "--tokenizer"]
    local_ids = hc.strata_stdout(*tokenize, f"{repos['main']}/sub")
    hf_tok_home = os.path.join(work, "hf-tok-home")
    snapshot_download("owner/repo", revision="main", cache_dir=os.path.join(hf_tok_home, "hub"),
                      allow_patterns=["sub/tokenizer*", "sub/special_tokens_map.json"])
    before = requests()
    checks.equal("Strata tokenizer offline from huggingface_hub's tokenizer files",
                 hc.strata_stdout(*tokenize, "hf://owner/repo/sub", env={"HF_HOME": hf_tok_home, "HF_HUB_OFFLINE": "1"}),
                 local_ids)
    checks.equal("requests to the Hub while Strata resolved the tokenizer offline", requests() - before, 0)
    strata_tok_home = os.path.join(work, "strata-tok-home")
    checks.equal("Strata tokenizer downloaded from hf://owner/repo/sub",
                 hc.strata_stdout(*tokenize, "hf://owner/repo/sub", env={"HF_HOME": strata_tok_home}), local_ids)
    info = scan_cache_dir(os.path.join(strata_tok_home, "hub"))
    checks.equal("scan_cache_dir of a tokenizer download: warnings", [str(w) for w in info.warnings], [])
    got = sorted(os.path.relpath(f.file_path, r.snapshot_path) for repo in info.repos for r in repo.revisions
                 for f in r.files)
    wanted = sorted(f for f in hf_files["main"] if f.startswith("sub/") and os.path.basename(f) in
                    ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"))
    checks.true("the repo has tokenizer files", len(wanted) >= 2, str(wanted))
    checks.equal("scan_cache_dir of a tokenizer download: the tokenizer files only", got, wanted)
finally:
    hub.terminate()
    hub.wait()
checks.done()
