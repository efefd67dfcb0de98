#!/usr/bin/env bash
# The main job on the embedded default: install dependencies, build, tokenize the fortunes
# corpus, train configs/tiny.yaml on CPU with two FSDP ranks (one per core; one rank on a
# one-core machine), checkpointing every 100 steps, and say where everything is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
scripts/setup.sh
scripts/build.sh
strata="${STRATA_BUILD_DIR:-$root/build}/strata"

if [ ! -f data/tiny/meta.json ]; then
  "$strata" prepare-data --input /usr/share/games/fortunes --out data/tiny \
    --vocab-size 2048 --separator %
fi
ranks=$(( $(nproc) >= 2 ? 2 : 1 ))
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
train_start=$(date +%s)
mpirun -np "$ranks" --bind-to core "$strata" train --config configs/tiny.yaml "$@"
end=$(date +%s)

run_dir=$("$strata" train --config configs/tiny.yaml "$@" --print-config |
  sed -n '/^job:/,/^[a-z]/s/^  run_dir: *//p' | head -1)
python3 - "$run_dir" data/tiny/meta.json <<'PY'
import json, sys
run_dir, meta = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl")]
evals = [r for r in rows if "val_loss" in r]
entropy = json.load(open(meta))["unigram_entropy_nats"]
if evals:
    print(f"final val_loss {evals[-1]['val_loss']:.4f} nats/token at step {evals[-1]['step']} "
          f"(unigram entropy of the data: {entropy:.4f})")
PY
cat <<MSG

Outputs
  resolved config  $run_dir/config.yaml
  metrics          $run_dir/metrics.jsonl  (plot: scripts/plot_metrics.py $run_dir/metrics.jsonl)
  samples          $run_dir/samples.txt
  checkpoints      $run_dir/checkpoints (latest: $(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo none); list one with: $strata inspect $run_dir/checkpoints)
  HF export        $run_dir/checkpoints/hf-latest (a LlamaForCausalLM directory; try: $strata generate --from $run_dir/checkpoints/hf-latest --prompt "The")
  data             data/tiny/ (tokenizer.model, train/val shards, meta.json)
Training took $((end - train_start)) s; the whole demo $((end - start)) s.
Running the demo again resumes this run from its latest checkpoint (a finished run has nothing
left to train): remove $run_dir to train from scratch.
MSG
