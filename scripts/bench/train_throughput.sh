#!/usr/bin/env bash
# Training throughput, Strata vs PyTorch, all measurements in this invocation on this machine:
# the same Llama (shapes, batch, sequence length, AdamW, grad clipping, fp32, intra-op threads)
# trained by `strata train` and by scripts/bench/reference_llama.py, an idiomatic PyTorch loop on
# the project environment's PyTorch (third_party/pyenv: the same LibTorch Strata links, MKL
# included), in two ways: eager (F.scaled_dot_product_attention) and under torch.compile
# (inductor's CPU backend). Runs alternate A B C A B C, on
#   micro  dim 64, 2 layers, vocab 512, seq 64, batch 8  (per-op overhead dominates)
#   tiny   configs/tiny.yaml's model and batch           (3.1M parameters, seq 128)
#   small  dim 512, 8 layers, vocab 4096, batch 2        (29.4M parameters, seq 512)
# each on 1 rank x all cores and on 2 ranks x (cores / 2) threads: Strata FSDP (the default
# activation_checkpointing, auto, and the mode auto did not pick) against DistributedDataParallel
# over gloo, same global batch. Prints a Markdown table: tokens/s (median of the runs), Strata /
# each reference, the fp32 GEMM rate measured with the same layout on the model's matmul shapes,
# each trainer's FLOP/s as a share of it, and peak RSS per rank (/usr/bin/time).
#   scripts/bench/train_throughput.sh
# Environment: RUNS (3: runs of each trainer), QUICK=1 (a smoke test: one short run each, micro
# and tiny only), CONFIGS ("micro tiny small"), RANKS ("1 2"), REPLICATED=1 (also Strata with
# fsdp.enabled: false), ATEN=1 (also Strata with training.fused_kernels=false: ATen ops instead of its
# fused CPU kernels), COMPILED=0 (leave out the torch.compile reference), STRATA_BUILD_DIR
# (build). Needs scripts/setup.sh's environment and no prepared data: both trainers read the
# same shard of random tokens written here. Other processes on the machine slow it and skew the
# figures (the report gives their CPU share per run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
strata="${STRATA_BUILD_DIR:-$root/build}/strata"
py="$root/third_party/pyenv/bin/python"  # the project environment (scripts/setup.sh)
reference="$root/scripts/bench/reference_llama.py"
quick=${QUICK:-0}
runs=${RUNS:-$([ "$quick" = 1 ] && echo 1 || echo 3)}
configs=${CONFIGS:-$([ "$quick" = 1 ] && echo micro tiny || echo micro tiny small)}
layouts=${RANKS:-1 2}
cores=$(nproc)

"$py" -c 'import torch, yaml, numpy' ||
  { echo "train_throughput: $py cannot import torch, yaml and numpy; run scripts/setup.sh" >&2; exit 1; }
[ -x "$strata" ] || { echo "train_throughput: $strata not found; build first (scripts/build.sh)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "train_throughput: /usr/bin/time is missing (apt-get install time)" >&2; exit 1; }

out=$(mktemp -d "${TMPDIR:-/tmp}/bench-throughput-XXXXXX")
trap 'rm -rf "$out"' EXIT
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export GLOO_SOCKET_IFNAME=lo

# Model and batch of each config (on top of configs/tiny.yaml), steps, and the warm-up steps
# left out of the measurement. Small: global batch 2 keeps a step to a few seconds on 2 cores.
declare -A model steps warmup
model[micro]="model.vocab_size=512 model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 model.max_seq_len=64 data.seq_len=64 training.global_batch_size=8 training.micro_batch_size=4"
model[tiny]=""
model[small]="model.vocab_size=4096 model.dim=512 model.n_layers=8 model.n_heads=8 model.n_kv_heads=4 model.multiple_of=256 model.max_seq_len=512 data.seq_len=512 training.global_batch_size=2 training.micro_batch_size=1"
if [ "$quick" = 1 ]; then
  steps=([micro]=12 [tiny]=6 [small]=3) warmup=([micro]=4 [tiny]=2 [small]=1) gemm_seconds=0.1
else
  steps=([micro]=60 [tiny]=12 [small]=5) warmup=([micro]=10 [tiny]=4 [small]=2) gemm_seconds=1
fi

# Resolved configs: Strata prints what it will run and the reference reads the same file.
resolve() {  # OUT.yaml CONFIG RANKS [key=value ...]
  local file=$1 name=$2 ranks=$3; shift 3
  local sets=() kv
  for kv in ${model[$name]} "$@"; do sets+=(--set "$kv"); done
  "$strata" train --config configs/tiny.yaml --print-config "${sets[@]}" \
    --set data.train="$out/data-$name.bin" --set data.val=null --set data.tokenizer=null \
    --set checkpoint.enable=false --set training.eval_interval=0 --set training.log_interval=1 \
    --set training.steps="${steps[$name]}" --set parallel.threads_per_rank=$(( cores / ranks > 0 ? cores / ranks : 1 )) \
    >"$file"
}
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
busy_ticks() { awk -v t="$(date +%s.%N)" '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9, t; exit}' /proc/stat; }
launch() {  # TAG RANKS CMD...: one process per rank under mpirun; each rank's peak RSS (KiB),
            # wall, user and system seconds in TAG.time.R; the machine's busy CPU ticks around it
  local tag=$1 ranks=$2; shift 2
  busy_ticks >"$out/$tag.busy"
  mpirun --bind-to none -np "$ranks" -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT="$(free_port)" \
    -x GLOO_SOCKET_IFNAME sh -c 'exec /usr/bin/time -f "%M %e %U %S" -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
    "$out/$tag.time" "$@" >"$out/$tag.log" 2>&1 ||
    { echo "train_throughput: $tag failed:" >&2; tail -40 "$out/$tag.log" >&2; exit 1; }
  busy_ticks >>"$out/$tag.busy"
}

"$strata" --version | sed -n 's/^BLAS: //p' >"$out/blas"
launch baseline-strata 1 "$strata" train --config configs/tiny.yaml --print-config
launch baseline-reference 1 "$py" -c 'import numpy, yaml, torch, torch.distributed, torch.nn.parallel'
echo "train_throughput: $cores cores, runs $runs, configs: $configs, ranks: $layouts (results in $out while running)" >&2
for name in $configs; do
  [ -n "${model[$name]+x}" ] || { echo "train_throughput: unknown config $name" >&2; exit 1; }
  resolve "$out/probe-$name.yaml" "$name" 1
  vocab=$("$py" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["model"]["vocab_size"])' "$out/probe-$name.yaml")
  "$py" "$reference" shard "$out/data-$name.bin" --vocab-size "$vocab" --tokens 1000000
  for ranks in $layouts; do
    key="$name-$ranks"
    resolve "$out/$key-strata.yaml" "$name" "$ranks"
    extra=()  # Strata variants besides the default
    if [ "${ATEN:-0}" = 1 ]; then
      extra+=(strata_aten)
      cp "$out/$key-strata.yaml" "$out/$key-strata_aten.yaml"
    fi
    if [ "$ranks" -gt 1 ] && [ "${REPLICATED:-0}" = 1 ]; then
      extra+=(strata_replicated)
      resolve "$out/$key-strata_replicated.yaml" "$name" "$ranks" parallel.fsdp.enabled=false
    fi
    echo "train_throughput: $key: GEMM rate, then Strata (default${extra[*]:+, ${extra[*]}}$([ "$ranks" -gt 1 ] && echo ", the other activation_checkpointing mode")) and the reference x $runs" >&2
    # The reference's OpenMP pool sized like its intra-op threads (as torchrun does): inductor's
    # kernels otherwise start one OpenMP thread per core in every rank.
    threads=$(( cores / ranks > 0 ? cores / ranks : 1 ))
    OMP_NUM_THREADS=$threads launch "$key-gemm" "$ranks" "$py" "$reference" gemm "$out/$key-strata.yaml" --out "$out/$key-gemm.json" --seconds "$gemm_seconds"
    for run in $(seq 1 "$runs"); do
      launch "$key-strata-$run" "$ranks" "$strata" train --config "$out/$key-strata.yaml" --set job.run_dir="$out/$key-strata-$run"
      mv "$out/$key-strata-$run/metrics.jsonl" "$out/$key-strata-$run.jsonl"
      if [ "$ranks" -gt 1 ] && [ "$run" = 1 ]; then
        # FSDP: also the activation_checkpointing mode the default did not pick (auto -> full | none).
        chosen=$(sed -n 's/.*activation_checkpointing auto -> \([a-z]*\).*/\1/p' "$out/$key-strata-1.log" | head -1)
        [ -n "$chosen" ] || chosen=$("$py" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["parallel"]["fsdp"]["activation_checkpointing"])' "$out/$key-strata.yaml")
        other=$([ "$chosen" = none ] && echo full || echo none)
        echo "$chosen" >"$out/$key-chosen"
        extra=("strata_$other" "${extra[@]}")
        resolve "$out/$key-strata_$other.yaml" "$name" "$ranks" parallel.fsdp.activation_checkpointing="$other"
      fi
      references=(reference)
      [ "${COMPILED:-1}" = 0 ] || references+=(reference_compiled)
      for v in "${extra[@]}" "${references[@]}"; do
        tag="$key-$v-$run"
        if [ "$v" = reference ]; then
          OMP_NUM_THREADS=$threads launch "$tag" "$ranks" "$py" "$reference" train "$out/$key-strata.yaml" --metrics "$out/$tag.jsonl"
        elif [ "$v" = reference_compiled ]; then
          OMP_NUM_THREADS=$threads launch "$tag" "$ranks" "$py" "$reference" train "$out/$key-strata.yaml" --metrics "$out/$tag.jsonl" --compile
        elif [ "$v" = strata_aten ]; then
          launch "$tag" "$ranks" "$strata" train --config "$out/$key-$v.yaml" --set job.run_dir="$out/$tag" --set training.fused_kernels=false
          mv "$out/$tag/metrics.jsonl" "$out/$tag.jsonl"
        else
          launch "$tag" "$ranks" "$strata" train --config "$out/$key-$v.yaml" --set job.run_dir="$out/$tag"
          mv "$out/$tag/metrics.jsonl" "$out/$tag.jsonl"
        fi
      done
    done
    echo "${extra[*]}" >"$out/$key-variants"
    echo "${references[*]}" >"$out/$key-references"
  done
done

PYTHONPATH="$root/scripts/bench" "$py" - "$out" "$runs" "$configs" "$layouts" "$cores" "${REPLICATED:-0}" \
  "${warmup[micro]} ${warmup[tiny]} ${warmup[small]}" <<'PY'
import glob, json, os, statistics, sys
import yaml
from llama_flops import params_and_flops
out, runs, configs, layouts, cores, replicated = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), int(sys.argv[5]), sys.argv[6] == "1"
warmup = dict(zip(("micro", "tiny", "small"), map(int, sys.argv[7].split())))

def tokens_per_s(path, tokens_per_step, skip):
    """Steady state: tokens of steps after the warm-up over their summed step time."""
    rows = [json.loads(l) for l in open(path)]
    rows = [r for r in rows if "step_ms" in r and r["step"] > skip]
    return tokens_per_step * len(rows) / (sum(r["step_ms"] for r in rows) / 1000.0)

def peak_rss_mib(tag, ranks):
    """Largest peak RSS of the ranks (/usr/bin/time %M, KiB)."""
    return max(int(open(f"{out}/{tag}.time.{r}").read().split()[-4]) / 1024.0 for r in range(ranks))

def foreign_load(tag, ranks):
    """Share of the machine's CPU time during the launch not spent by the ranks themselves
    (/proc/stat busy ticks minus the ranks' user + system time): other processes, mpirun."""
    (b0, t0), (b1, t1) = [map(float, l.split()) for l in open(f"{out}/{tag}.busy")]
    ours = sum(sum(map(float, open(f"{out}/{tag}.time.{r}").read().split()[-2:])) for r in range(ranks))
    return max(0.0, (b1 - b0) / os.sysconf("SC_CLK_TCK") - ours) / ((t1 - t0) * cores)

import platform, re, torch
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
ref_blas = "MKL" if torch.backends.mkl.is_available() else "not MKL"
print(f"Machine: {cores} cores, {cpu}; PyTorch / LibTorch {torch.__version__}. BLAS: Strata {open(out + '/blas').read().strip()}; "
      f"reference: {ref_blas} (the same libtorch_cpu.so)\n")

rows, trials, gemm_lines, loads = [], [], [], []
for name in configs:
    for ranks in map(int, layouts):
        key = f"{name}-{ranks}"
        c = yaml.safe_load(open(f"{out}/{key}-strata.yaml"))
        params, fpt = params_and_flops(c)
        logged = re.search(r"([0-9.]+) MFLOP/token", open(f"{out}/{key}-strata-1.log").read())
        if not logged or abs(float(logged.group(1)) - fpt / 1e6) > 0.06:
            print(f"WARNING: {key}: FLOPs/token {fpt / 1e6:.2f}M here, Strata logs "
                  f"{logged.group(1) if logged else 'none'} (trainer/llama.cpp changed?)", file=sys.stderr)
        threads = c["parallel"]["threads_per_rank"]
        tps = c["training"]["global_batch_size"] * c["data"]["seq_len"]
        gemm = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{key}-gemm.json.*"))]
        per_shape = {s: sum(g["gflops"][s] for g in gemm) for s in gemm[0]["gflops"]}
        peak = max(per_shape.values())
        gemm_lines.append(f"{key} ({gemm[0]['rows']} rows, {ranks} x {threads}): "
                          + ", ".join(f"{s} {v:.1f}" for s, v in per_shape.items()))
        variants = ["strata"] + open(f"{out}/{key}-variants").read().split()
        references = open(f"{out}/{key}-references").read().split()
        chosen = open(f"{out}/{key}-chosen").read().strip() if ranks > 1 else None
        res = {}
        for v in variants + references:
            t = [tokens_per_s(f"{out}/{key}-{v}-{i}.jsonl", tps, warmup[name]) for i in range(1, runs + 1)]
            rss = max(peak_rss_mib(f"{key}-{v}-{i}", ranks) for i in range(1, runs + 1))
            load = [foreign_load(f"{key}-{v}-{i}", ranks) for i in range(1, runs + 1)]
            loads += load
            res[v] = (statistics.median(t), rss, max(t))
            comm = ""
            if v.startswith("strata") and ranks > 1:
                shares = [r["comm_fraction"] for i in range(1, runs + 1) for r in map(json.loads, open(f"{out}/{key}-{v}-{i}.jsonl"))
                          if r["step"] > warmup[name] and "comm_fraction" in r]
                comm = f", Strata's comm share {100 * statistics.median(shares):.1f}%"
            trials.append(f"{key} {v}: " + " / ".join(f"{x:.0f}" for x in t) + " tok/s (other load "
                          + " / ".join(f"{100 * x:.0f}%" for x in load) + comm + ")")
        eager = res["reference"]
        compiled = res.get("reference_compiled", (float("nan"),) * 3)
        for v in variants:
            mode = {"strata": f"FSDP, default (`{c['parallel']['fsdp']['activation_checkpointing']}` -> {chosen})" if ranks > 1 else "one rank",
                    "strata_none": "FSDP, `activation_checkpointing: none` (keep)",
                    "strata_full": "FSDP, `activation_checkpointing: full` (recompute)",
                    "strata_replicated": "replicated (`fsdp.enabled: false`)",
                    "strata_aten": "ATen ops (`training.fused_kernels: false`)" + (", default FSDP mode" if ranks > 1 else "")}[v]
            s_tps, s_rss, s_best = res[v]
            share = lambda x: f"{100 * x * fpt / 1e9 / peak:.1f}%"
            rows.append(f"| {name} ({params / 1e6:.2f}M, seq {c['data']['seq_len']}) | {ranks} x {threads} | {mode} "
                        f"| {s_tps:.0f} | {eager[0]:.0f} | {compiled[0]:.0f} | **{s_tps / eager[0]:.2f}** | **{s_tps / compiled[0]:.2f}** "
                        f"| {s_best / eager[2]:.2f} / {s_best / compiled[2]:.2f} | {peak:.1f} "
                        f"| {share(s_tps)} | {share(eager[0])} | {share(compiled[0])} "
                        f"| {s_rss:.0f} | {eager[1]:.0f} | {compiled[1]:.0f} |")
print("| config | ranks x threads | Strata mode | Strata tok/s | eager tok/s | compiled tok/s | Strata / eager | Strata / compiled "
      "| best / best (eager / compiled) | GEMM peak GFLOP/s | Strata % of peak | eager % | compiled % "
      "| peak RSS/rank MiB: Strata | eager | compiled |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
print("\n".join(rows))
print(f"\nMedians of {runs} run(s) per trainer, runs alternating (best / best: the ratio of each trainer's fastest run, "
      f"the least disturbed by other load); tokens/s over the steps after the warm-up "
      f"({', '.join(f'{k} {v}' for k, v in warmup.items() if k in configs)} steps left out). "
      f"GEMM peak: the best fp32 rate (GFLOP/s, summed over the ranks running at once) over the forward, "
      f"input-gradient and weight-gradient matmuls of the model's linear layers, measured before the runs; "
      f"FLOP/s = tokens/s x Llama::training_flops_per_token.")
print(f"\nCPU time of other processes during the runs: mean {100 * statistics.mean(loads):.0f}%, "
      f"max {100 * max(loads):.0f}% of the {cores} cores (0% on an idle machine; more makes the runs slower "
      f"and noisier, especially multi-threaded ranks).")
base = {k: int(open(f"{out}/baseline-{k}.time.0").read().split()[-4]) / 1024.0 for k in ("strata", "reference")}
print(f"\nPeak RSS of the processes alone (no model): Strata {base['strata']:.0f} MiB (`strata train --print-config`), "
      f"Python with torch {base['reference']:.0f} MiB (`import torch`).")
print("\nEvery run (tokens/s; other load = CPU share used by other processes, mpirun included):")
for t in trials:
    print(f"- {t}")
print("\nGEMM GFLOP/s by matmul (micro batch x seq rows):")
for g in gemm_lines:
    print(f"- {g}")
PY
