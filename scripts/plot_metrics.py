#!/usr/bin/python3
"""Renders a Strata metrics.jsonl (training and validation rows) to a PNG.

usage: scripts/plot_metrics.py RUN_DIR/metrics.jsonl [-o out.png]
Needs Debian's python3-matplotlib (installed by scripts/setup.sh).
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="path of metrics.jsonl")
    parser.add_argument("-o", "--out", help="output PNG (default: next to the metrics file)")
    args = parser.parse_args()

    train, val = [], []
    with open(args.metrics) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"error: {args.metrics}:{number}: not JSON ({e})", file=sys.stderr)
                return 1
            (val if "val_loss" in row else train).append(row)
    if not train:
        print(f"error: {args.metrics} has no training rows", file=sys.stderr)
        return 1

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train")
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    axes[0].set_title("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r["tokens_per_s"] for r in train])
    axes[2].set_title("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = args.out or args.metrics.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=100)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
