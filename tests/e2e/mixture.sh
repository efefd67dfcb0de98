#!/usr/bin/env bash
# End-to-end data mixtures (data.sources): two datasets of different text with one tokenizer;
# the same losses, source counts and per-source validation on 1 and 2 ranks; tokens per source
# that add up to every step's batch in the weights' proportions; val_loss the weighted mean of
# the sources'; an interrupted and resumed run that continues the uninterrupted one; a single
# dataset's metrics unchanged; and the errors a user can cause.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
fortunes=/usr/share/games/fortunes
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

"$STRATA_BIN" prepare-data --input "$fortunes/literature" --out lit --vocab-size 512 \
  --separator % >prep_lit.log 2>&1 || { cat prep_lit.log; fail "prepare-data lit failed"; }
"$STRATA_BIN" prepare-data --input "$fortunes/linux" --out tux --tokenizer lit/tokenizer.model \
  --separator % >prep_tux.log 2>&1 || { cat prep_tux.log; fail "prepare-data tux failed"; }

cat > job.yaml <<YAML
job: {name: mix, run_dir: mix1, seed: 5}
model: {vocab_size: 512, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data:
  sources:
    - {name: lit, path: "lit/train_*.bin", weight: 3, val: "lit/val_*.bin"}
    - {name: tux, path: "tux/train_*.bin", weight: 1, val: "tux/val_*.bin"}
  tokenizer: lit/tokenizer.model
  seq_len: 32
training: {steps: 8, global_batch_size: 8, micro_batch_size: 4, eval_interval: 4, eval_batches: 1, log_interval: 1}
parallel: {threads_per_rank: 1}
checkpoint: {interval: 4, last_save_in_hf: false, keep_latest_k: 0}
YAML
train 1 mix1
train 2 mix2
# Interrupted at step 4, resumed from its checkpoint: a fresh run directory holding it.
mkdir -p resumed/checkpoints
cp -r mix1/checkpoints/step-0000004 resumed/checkpoints/
train 1 resumed
grep -q "resume: loaded model, optimizer, lr_scheduler, dataloader, rng from resumed/checkpoints/step-0000004 (step 4)" resumed.log ||
  { cat resumed.log; fail "no resume from step 4"; }

grep -q "data: a mixture of 2 sources" mix1.log || { cat mix1.log; fail "no mixture in the data line"; }
grep -q "lit (75.0%): train .* tokens in 1 shard(s) (lit/train_\*.bin); val .* tokens (lit/val_\*.bin)" mix1.log ||
  { cat mix1.log; fail "no source line"; }
grep -Eq "^step 8/8 \| .* \| mix lit [0-9]+% tux [0-9]+%$" mix1.log || { cat mix1.log; fail "no source shares in the step line"; }
grep -Eq "^eval step 8 \| val_loss [0-9.]+ over [0-9]+ tokens \(lit [0-9.]+, tux [0-9.]+\)$" mix1.log ||
  { cat mix1.log; fail "no per-source val_loss in the eval line"; }

python3 - <<'PY'
import json, math
def rows(d):
    return [json.loads(l) for l in open(d + "/metrics.jsonl")]
def steps(d):
    return {r["step"]: r for r in rows(d) if "loss" in r}
def evals(d):
    return {r["step"]: r for r in rows(d) if "val_loss" in r}
one, two = steps("mix1"), steps("mix2")
assert sorted(one) == list(range(1, 9)), sorted(one)
tokens_per_step = 8 * 32
total = {"lit": 0, "tux": 0}
for step, r in one.items():
    by = r["tokens_by_source"]
    assert set(by) == {"lit", "tux"}, r
    assert sum(by.values()) == tokens_per_step, r  # one step per row (log_interval 1)
    assert all(v % 32 == 0 for v in by.values()), r
    assert two[step]["tokens_by_source"] == by, (step, by, two[step])
    assert abs(two[step]["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]), (step, r["loss"], two[step]["loss"])
    for k in total:
        total[k] += by[k]
assert sum(total.values()) == tokens_per_step * 8, total
# 64 samples, p(lit) = 0.75: within 5 standard deviations of the binomial.
n, p, lit = 64, 0.75, total["lit"] // 32
assert abs(lit - n * p) <= 5 * math.sqrt(n * p * (1 - p)), total
e1, e2 = evals("mix1"), evals("mix2")
assert sorted(e1) == [4, 8] and sorted(e2) == [4, 8], (e1, e2)
for step, r in e1.items():
    by = r["val_loss_by_source"]
    assert set(by) == {"lit", "tux"}, r
    assert abs(r["val_loss"] - (3 * by["lit"] + by["tux"]) / 4) <= 1e-9 * r["val_loss"], r
    assert r["val_tokens"] > 0, r
    for k in ("val_loss", "val_tokens"):
        assert abs(e2[step][k] - r[k]) <= 1e-5 * abs(r[k]), (step, k, r, e2[step])
    for k in by:
        assert abs(e2[step]["val_loss_by_source"][k] - by[k]) <= 1e-5 * by[k], (step, k, r, e2[step])
assert abs(e1[8]["val_loss_by_source"]["lit"] - e1[8]["val_loss_by_source"]["tux"]) > 1e-3, e1[8]
# The resumed run continues the uninterrupted one: steps 5..8 and the evaluation at 8.
res, res_eval = steps("resumed"), evals("resumed")
assert sorted(res) == [5, 6, 7, 8], sorted(res)
for step, r in res.items():
    assert r["loss"] == one[step]["loss"], (step, r["loss"], one[step]["loss"])
    assert r["tokens_by_source"] == one[step]["tokens_by_source"], (step, r, one[step])
assert res_eval[8]["val_loss_by_source"] == e1[8]["val_loss_by_source"], (res_eval, e1)
print(f"mixture: tokens {total}; losses equal on 1 and 2 ranks and after resume; "
      f"val_loss {e1[8]['val_loss']:.4f} {e1[8]['val_loss_by_source']}")
PY

# A single dataset keeps its metrics as they were: no per-source keys.
cat > single.yaml <<YAML
job: {name: one, run_dir: single, seed: 5}
model: {vocab_size: 512, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "lit/train_*.bin", val: "lit/val_*.bin", seq_len: 32}
training: {steps: 2, global_batch_size: 8, micro_batch_size: 8, eval_interval: 2, eval_batches: 1, log_interval: 1}
parallel: {threads_per_rank: 1}
checkpoint: {enable: false}
YAML
"$STRATA_BIN" train --config single.yaml >single.log 2>&1 || { cat single.log; fail "single run failed"; }
grep -q "source" single/metrics.jsonl && { cat single/metrics.jsonl; fail "per-source keys without data.sources"; }
grep -Eq "^eval step 2 \| val_loss [0-9.]+ over [0-9]+ tokens$" single.log || { cat single.log; fail "eval line changed"; }

# Errors.
expect_error "config error: data.val does not apply to data.sources" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=bad1 --set data.val=lit/val_000000.bin
expect_error "config error: data.sources and data.train are both given" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=bad2 --set data.train=lit/train_000000.bin
expect_error "config error: data.sources.1.name 'lit' names both data.sources.0 and data.sources.1" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=bad3 --set data.sources.1.name=lit
expect_error "data source 'tux' (data.sources.1): " \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=bad4 --set 'data.sources.1.path=none/train_*.bin'
expect_error "data.document_masking is on, but the shards of every one of the 2 data.sources do not mark where documents start" \
  "$STRATA_BIN" train --config job.yaml --set job.run_dir=bad5 --set data.document_masking=true
# --print-config writes the sources back.
"$STRATA_BIN" train --config job.yaml --print-config >printed.yaml
grep -q "    - name: tux" printed.yaml || { cat printed.yaml; fail "--print-config lost data.sources"; }
echo "mixture: all checks passed"
