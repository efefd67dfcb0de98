#!/usr/bin/env bash
# What per-document attention (data.document_masking) costs and gives on the instruction-tuning
# example: configs/sft.yaml (LoRA on the demo's model, packed chat windows of 129 tokens), run
# with and without the document mask, in alternation.
#   scripts/bench/document_masking.sh [ROUNDS] [STEPS]      (defaults 3 and 200)
# Needs the demo's model and the prepared chat data (the commands at the top of
# configs/sft.yaml). Prints, per variant, the median of the runs' median tokens/s, the ratio,
# and the masked validation loss at each evaluation of the last round.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rounds=${1:-3}
steps=${2:-200}
strata="${STRATA_BUILD_DIR:-$root/build}/strata"
cd "$root"
for need in runs/tiny/checkpoints/hf-latest data/sft/train_000000.bin; do
  [ -e "$need" ] || { echo "missing $need: run scripts/demo.sh and the commands at the top of configs/sft.yaml" >&2; exit 1; }
done
out=$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-docmask-XXXXXX")
trap 'rm -rf "$out"' EXIT

for round in $(seq "$rounds"); do
  for masking in false true; do
    dir="$out/$masking-$round"
    "$strata" train --config configs/sft.yaml --set job.run_dir="$dir" --set training.steps="$steps" \
      --set checkpoint.enable=false --set data.document_masking="$masking" >"$dir.log" 2>&1 ||
      { cat "$dir.log"; exit 1; }
  done
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(masking, r):
    return [json.loads(l) for l in open(f"{out}/{masking}-{r}/metrics.jsonl")]
speed, curves = {}, {}
for masking in ("false", "true"):
    per_run = [statistics.median(x["tokens_per_s"] for x in rows(masking, r) if "tokens_per_s" in x)
               for r in range(1, rounds + 1)]
    speed[masking] = statistics.median(per_run)
    curves[masking] = [(x["step"], x["val_loss"]) for x in rows(masking, rounds) if "val_loss" in x]
print(f"{'variant':<28}{'tok/s (median)':>16}  masked val_loss by step")
for masking, name in (("false", "attention across records"), ("true", "document masking")):
    losses = ", ".join(f"{s}: {v:.3f}" for s, v in curves[masking])
    print(f"{name:<28}{speed[masking]:>16.0f}  {losses}")
print(f"document masking / across records: {speed['true'] / speed['false']:.2f}x tokens/s")
EOF
