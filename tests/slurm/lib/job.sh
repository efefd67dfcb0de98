# shellcheck shell=bash disable=SC2154  # fail() comes from tests/e2e/lib/common.sh
# The training job of the Slurm tests (sourced after tests/e2e/lib/common.sh): the embedded
# tiny model of the other end-to-end tests on the fortunes corpus.
#
#   slurm_job_prepare STEPS     tokenize the corpus into data/ and write job.yaml
#   losses_equal REF RUN [FIRST_STEP]
#                               RUN's per-step losses equal REF's from FIRST_STEP on, bit for
#                               bit (metrics.jsonl prints doubles round-trippably), each step
#                               logged once

slurm_job_prepare() {
  "$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
    /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >/dev/null ||
    fail "prepare-data failed"
  cat > job.yaml <<YAML
job: {name: slurm, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: $1, global_batch_size: 12, micro_batch_size: 1, eval_interval: 0, log_interval: 1}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 1000}
YAML
}

losses_equal() {
  python3 - "$1" "$2" "${3:-1}" <<'PY'
import json, sys
ref_dir, run_dir, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
def losses(d):
    rows = [r for r in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in r]
    steps = [r["step"] for r in rows]
    if len(steps) != len(set(steps)):
        sys.exit("FAIL: %s logged a step twice: %s" % (d, steps))
    return {r["step"]: r["loss"] for r in rows}
ref = {s: l for s, l in losses(ref_dir).items() if s >= first}
got = losses(run_dir)
if sorted(got) != sorted(ref) or not got:
    sys.exit("FAIL: %s logged steps %s, %s steps %s" % (run_dir, sorted(got), ref_dir, sorted(ref)))
for step in sorted(ref):
    if got[step] != ref[step]:
        sys.exit("FAIL: %s step %d loss %r != %s %r" % (run_dir, step, got[step], ref_dir, ref[step]))
print("%s: losses of steps %d-%d equal %s's bit for bit" % (run_dir, min(ref), max(ref), ref_dir))
PY
}
