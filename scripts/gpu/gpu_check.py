#!/usr/bin/env python3
"""The judgements of scripts/gpu/check.sh, on metrics.jsonl files (one JSON row per logged step:
step, loss, tokens_per_s, tflops, mfu, step_ms, mem_mb, on CUDA mem_reserved_mb; rows without
"loss" are evaluations and are skipped). Each subcommand prints one line of detail and exits 1
when the check fails; nothing here needs PyTorch.

  gpu_check.py parity A.jsonl B.jsonl --steps N --rel R
      Both runs logged steps 1..N and every step's losses agree within R relative.
  gpu_check.py bf16 BF16.jsonl FP32.jsonl --steps N --rel R --drop D
      The bf16 run's losses are finite, its last 5 steps' mean is at least D nats below its first
      5 steps' mean, and each step's loss is within R relative of the fp32 run's.
  gpu_check.py resume STRAIGHT.jsonl RESUMED.jsonl --first S --last E
      The resumed run logged exactly steps S..E, with losses bit-identical to the straight run's.
  gpu_check.py hashes STEP_DIR_A STEP_DIR_B
      Two checkpoint directories hold files of equal SHA-256 (their metadata.json).
  gpu_check.py bench --config CONFIG.yaml --warmup W --strata S.jsonl --eager E.jsonl
                     [--compiled C.jsonl] [--peak-tflops P] [--device-name NAME] [--min-ratio R]
      Prints a Markdown table: tokens/s (steps after the warm-up), MFU, peak memory, Strata's
      ratio to each reference. MFU: FLOPs/token (Llama::training_flops_per_token) x tokens/s
      over the peak: --peak-tflops when > 0, else the peak Strata's metrics imply (tflops / mfu),
      else a per-device table (dense bf16, by the GPU's name); n/a on CPU. Fails only when a
      run logged no measured step or when Strata / eager is under --min-ratio (default 0: none).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from llama_flops import params_and_flops  # noqa: E402


def rows(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if "loss" in r:
                out.append(r)
    return out


def losses(path):
    return {r["step"]: r["loss"] for r in rows(path)}


def fail(msg):
    print(msg)
    sys.exit(1)


def parity(args):
    a, b = losses(args.a), losses(args.b)
    want = list(range(1, args.steps + 1))
    if sorted(a) != want or sorted(b) != want:
        fail(f"logged steps differ from 1..{args.steps}: {sorted(a)[:3]}... vs {sorted(b)[:3]}...")
    worst, worst_step = 0.0, 0
    for s in want:
        if not (math.isfinite(a[s]) and math.isfinite(b[s])):
            fail(f"step {s}: non-finite loss ({a[s]} vs {b[s]})")
        rel = abs(a[s] - b[s]) / max(abs(a[s]), 1e-12)
        if rel > worst:
            worst, worst_step = rel, s
    detail = (f"{args.steps} steps, max relative loss difference {worst:.2e} (step {worst_step}), "
              f"tolerance {args.rel:g}; step 1 {a[1]:.6f} vs {b[1]:.6f}, "
              f"step {args.steps} {a[args.steps]:.6f} vs {b[args.steps]:.6f}")
    if worst > args.rel:
        fail(detail)
    print(detail)


def bf16(args):
    lo, ref = losses(args.bf16), losses(args.fp32)
    want = list(range(1, args.steps + 1))
    if sorted(lo) != want or sorted(ref) != want:
        fail(f"logged steps differ from 1..{args.steps}")
    bad = [s for s in want if not math.isfinite(lo[s])]
    if bad:
        fail(f"non-finite bf16 loss at steps {bad[:5]}")
    k = min(5, args.steps // 2)
    first = sum(lo[s] for s in want[:k]) / k
    last = sum(lo[s] for s in want[-k:]) / k
    rel = max(abs(lo[s] - ref[s]) / abs(ref[s]) for s in want)
    worst = max(want, key=lambda s: abs(lo[s] - ref[s]) / abs(ref[s]))
    last_ref = sum(ref[s] for s in want[-k:]) / k
    detail = (f"bf16 loss {lo[1]:.4f} -> {lo[args.steps]:.4f} (mean of first/last {k} steps "
              f"{first:.4f} -> {last:.4f}, drop {first - last:.3f} >= {args.drop:g} nats needed); "
              f"last {k} steps' mean {last:.4f} vs fp32 {last_ref:.4f}; max relative difference "
              f"to fp32 {rel:.2e} (step {worst}), tolerance {args.rel:g}")
    if first - last < args.drop or rel > args.rel:
        fail(detail)
    print(detail)


def resume(args):
    a, b = losses(args.straight), losses(args.resumed)
    want = list(range(args.first, args.last + 1))
    if sorted(b) != want:
        fail(f"the resumed run logged steps {sorted(b)}, expected {args.first}..{args.last} "
             f"(did it resume?)")
    diff = [s for s in want if a.get(s) != b[s]]
    if diff:
        s = diff[0]
        fail(f"steps {diff} differ; first: step {s} straight {a.get(s)!r} vs resumed {b[s]!r}")
    print(f"steps {args.first}..{args.last} bit-identical (step {args.last} loss {b[args.last]!r})")


def hashes(args):
    def of(d):
        with open(f"{d}/metadata.json") as f:
            m = json.load(f)
        return {name: f["sha256"] for name, f in sorted(m["files"].items())}
    a, b = of(args.a), of(args.b)
    if a != b:
        fail(f"checkpoint files differ: {[n for n in a if a.get(n) != b.get(n)]}")
    print(f"{len(a)} checkpoint file(s) with equal SHA-256")


# ---------------------------------------------------------------------------------------------
# Benchmark table

# Dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets), longest name first.
PEAKS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
         ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
         ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
         ("RTX 6000 Ada", 364.2)]


def steady(path, tokens_per_step, warmup):
    """tokens/s over the steps after the warm-up (their tokens over their summed step time),
    peak mem_mb and mem_reserved_mb, Strata's implied peak (tflops / mfu), steps measured."""
    rs = rows(path)
    measured = [r for r in rs if r["step"] > warmup and r.get("step_ms")]
    if not measured:
        return None
    tps = tokens_per_step * len(measured) / (sum(r["step_ms"] for r in measured) / 1000.0)
    mem = max((r.get("mem_mb") or 0.0) for r in rs)
    reserved = max((r.get("mem_reserved_mb") or 0.0) for r in rs) or None
    implied = [r["tflops"] / r["mfu"] for r in measured if r.get("mfu") and r.get("tflops")]
    return {"tps": tps, "mem": mem, "reserved": reserved, "steps": len(measured),
            "peak": implied[-1] if implied else None}


def bench(args):
    import yaml
    with open(args.config) as f:
        c = yaml.safe_load(f)
    params, fpt = params_and_flops(c)
    tokens_per_step = c["training"]["global_batch_size"] * c["data"]["seq_len"]
    runs = {"Strata": steady(args.strata, tokens_per_step, args.warmup),
            "PyTorch eager": steady(args.eager, tokens_per_step, args.warmup)}
    if args.compiled:
        runs["PyTorch compile"] = steady(args.compiled, tokens_per_step, args.warmup)
    missing = [k for k, v in runs.items() if v is None]
    peak, source = args.peak_tflops, "--peak-tflops"
    if not peak and runs["Strata"] and runs["Strata"]["peak"]:
        peak, source = runs["Strata"]["peak"], "Strata's logged tflops / mfu"
    if not peak and args.device_name:
        for name, p in PEAKS:
            if name in args.device_name:
                peak, source = p, f"dense bf16 of {name}"
                break
    m = c["model"]
    peak_text = f"{peak:.1f} TFLOP/s ({source})" if peak else "unknown (no MFU)"
    print(f"Model: {params / 1e6:.1f}M parameters (dim {m['dim']}, {m['n_layers']} layers, "
          f"{m['n_heads']}/{m['n_kv_heads']} heads, vocab {m['vocab_size']}), seq "
          f"{c['data']['seq_len']}, global batch {c['training']['global_batch_size']} "
          f"(micro {c['training']['micro_batch_size']}), {fpt / 1e9:.2f} GFLOP/token; "
          f"{args.device_name or 'CPU'}; peak {peak_text}; "
          f"tokens/s over steps after the first {args.warmup}.\n")
    print("| trainer | tokens/s | TFLOP/s | MFU | peak mem MiB (allocated / reserved) | Strata / this |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    s = runs["Strata"]
    for name, r in runs.items():
        if r is None:
            print(f"| {name} | no measured step | | | | |")
            continue
        tflops = r["tps"] * fpt / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        mem = f"{r['mem']:.0f}" + (f" / {r['reserved']:.0f}" if r["reserved"] else "")
        ratio = f"{s['tps'] / r['tps']:.2f}" if s and name != "Strata" else ""
        print(f"| {name} | {r['tps']:.0f} | {tflops:.2f} | {mfu} | {mem} | {ratio} |")
    summary = []
    if s:
        for name in ("PyTorch eager", "PyTorch compile"):
            if runs.get(name):
                summary.append(f"Strata/{name.split()[1]} {s['tps'] / runs[name]['tps']:.2f}")
        tflops = s["tps"] * fpt / 1e12
        mfu = f", MFU {100 * tflops / peak:.1f}%" if peak else ""
        summary.insert(0, f"Strata {s['tps']:.0f} tok/s{mfu}")
    line = "; ".join(summary)
    print(f"\nBENCH {line}")
    if missing:
        fail(f"no measured step in: {', '.join(missing)}")
    if args.min_ratio and s["tps"] / runs["PyTorch eager"]["tps"] < args.min_ratio:
        fail(f"Strata/eager {s['tps'] / runs['PyTorch eager']['tps']:.2f} < {args.min_ratio}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rel", type=float, required=True)
    p.set_defaults(fn=parity)
    p = sub.add_parser("bf16")
    p.add_argument("bf16")
    p.add_argument("fp32")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rel", type=float, required=True)
    p.add_argument("--drop", type=float, required=True)
    p.set_defaults(fn=bf16)
    p = sub.add_parser("resume")
    p.add_argument("straight")
    p.add_argument("resumed")
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--last", type=int, required=True)
    p.set_defaults(fn=resume)
    p = sub.add_parser("hashes")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(fn=hashes)
    p = sub.add_parser("bench")
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--strata", required=True)
    p.add_argument("--eager", required=True)
    p.add_argument("--compiled")
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--device-name", default="")
    p.add_argument("--min-ratio", type=float, default=0.0)
    p.set_defaults(fn=bench)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
