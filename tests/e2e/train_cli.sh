#!/usr/bin/env bash
# End-to-end: `strata train` as a user runs it — help, config errors through the CLI,
# --print-config, a short real run with its outputs, and a multi-rank launch.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

"$STRATA_BIN" --help | grep -q "train" || fail "--help lists no train"
"$STRATA_BIN" --help | grep -q "prepare-data" || fail "--help lists no prepare-data"
"$STRATA_BIN" train --help | grep -q -- "--set" || fail "train --help lists no --set"

# Data: a small corpus, a small tokenizer.
"$STRATA_BIN" prepare-data --input /usr/share/games/fortunes/fortunes \
  /usr/share/games/fortunes/literature --out data --vocab-size 400 --separator % >prep.txt

cat > job.yaml <<YAML
job: {name: e2e, run_dir: run, seed: 7}
model: {vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: 32}
data: {train: "data/train_*.bin", val: "data/val_*.bin", tokenizer: data/tokenizer.model, seq_len: 32}
training: {steps: 20, global_batch_size: 8, micro_batch_size: 4, eval_interval: 10, eval_batches: 2, log_interval: 5}
parallel: {threads_per_rank: 1}
YAML

# Config errors reach the user as one message with the key and line, exit code 1.
expect_error "model.n_layer" "$STRATA_BIN" train --config job.yaml --set model.n_layer=3
expect_error "did you mean model.n_layers" "$STRATA_BIN" train --config job.yaml --set model.n_layer=3
printf 'model:\n  dim: abc\n' > bad.yaml
expect_error "bad.yaml:2" "$STRATA_BIN" train --config bad.yaml
expect_error "error: " "$STRATA_BIN" train --config bad.yaml
expect_error "does not exist" "$STRATA_BIN" train --config missing.yaml
expect_error "data/none_*.bin" "$STRATA_BIN" train --config job.yaml --set 'data.train=data/none_*.bin'
expect_error "checkpoint.keep_latest_k = -2 must be >= 0" "$STRATA_BIN" train --config job.yaml --set checkpoint.keep_latest_k=-2
expect_error "checkpoint.async_mode = 'later' is not one of: disabled, async" "$STRATA_BIN" train --config job.yaml --set checkpoint.async_mode=later
expect_error "model.vocab_size" "$STRATA_BIN" train --config job.yaml --set model.vocab_size=100

# --print-config prints the resolved YAML with overrides applied, and trains nothing.
"$STRATA_BIN" train --config job.yaml --set training.steps=3 --set job.run_dir=printed \
  --print-config >resolved.yaml
grep -q "steps: 3" resolved.yaml || fail "override not in --print-config"
[ ! -e printed ] || fail "--print-config created the run directory"
rm -rf run

# A real run: outputs in the run directory, loss logged, final line.
"$STRATA_BIN" train --config job.yaml >train.txt 2>&1 || { cat train.txt; fail "train failed"; }
grep -q "step 20/20" train.txt || { cat train.txt; fail "no final step line"; }
grep -q "val_loss" train.txt || fail "no eval line"
[ -s run/config.yaml ] || fail "no run/config.yaml"
[ -s run/samples.txt ] || fail "no run/samples.txt"
[ "$(grep -c '"loss"' run/metrics.jsonl)" -eq 5 ] || fail "expected 5 step rows (1,5,10,15,20)"
[ "$(grep -c '"val_loss"' run/metrics.jsonl)" -eq 2 ] || fail "expected 2 eval rows"
# Checkpointing is on by default: the final step saves the weights and `latest` names it.
[ "$(cat run/checkpoints/latest)" = step-0000020 ] || fail "no final checkpoint"
"$STRATA_BIN" inspect run/checkpoints --verify | grep -q "model only" || fail "final save is not model-only"
# The written config is a complete config: it runs as is.
"$STRATA_BIN" train --config run/config.yaml --print-config >/dev/null
# The plot script renders it.
"$STRATA_SOURCE_DIR/scripts/plot_metrics.py" run/metrics.jsonl -o metrics.png >/dev/null
[ -s metrics.png ] || fail "plot_metrics.py wrote no PNG"

echo "train_cli: all checks passed"
