#!/usr/bin/env bash
# Checkpoint benchmark, all measurements in this invocation on the same disk: a ~100M-parameter
# Llama whose full training state (fp32 parameters + AdamW moments) is ~1.2 GB is saved
# synchronously and asynchronously and loaded back, next to `dd` writing (with fsync) and
# reading the same number of bytes. Loads and dd reads start from a cold page cache for the
# files involved (dd iflag=nocache drops them), so both read from the disk.
#   scripts/bench/checkpoint.sh [RANKS]      (default 1; needs data/tiny: scripts/demo.sh)
# Prints a Markdown table with ratios against dd and the async foreground stall / sync save.
# CHECKPOINT_SET: more KEY=VALUE overrides, space-separated, applied after the model's (e.g.
# "parallel.device=cuda data.train=SHARD" for saves from a GPU; scripts/gpu/check.sh does so).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
ranks=${1:-1}
strata="${STRATA_BUILD_DIR:-$root/build}/strata"
out=$(mktemp -d "${BENCH_DIR:-$root}/.bench-checkpoint-XXXXXX")  # on the project's disk
trap 'rm -rf "$out"' EXIT
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

model=(--set model.vocab_size=8192 --set model.dim=768 --set model.n_layers=12 --set model.n_heads=12
       --set model.n_kv_heads=12 --set model.multiple_of=256 --set model.max_seq_len=64
       --set data.seq_len=64 --set training.global_batch_size=$ranks --set training.micro_batch_size=1
       --set training.eval_interval=0 --set training.log_interval=1
       --set checkpoint.interval=1 --set checkpoint.keep_latest_k=1
       --set checkpoint.last_save_model_only=false)
for kv in ${CHECKPOINT_SET:-}; do model+=(--set "$kv"); done
run() {  # NAME STEPS [--set ...]
  local name=$1 steps=$2; shift 2
  mpirun --bind-to none -np "$ranks" "$strata" train --config configs/tiny.yaml "${model[@]}" \
    --set job.run_dir="$out/$name" --set training.steps="$steps" "$@" >>"$out/$name.log" 2>&1 ||
    { cat "$out/$name.log"; exit 1; }
}
drop_cache() { for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done; }
seconds_of() {  # CMD...: prints its wall time in seconds
  local start end
  start=$(date +%s%N); "$@"; end=$(date +%s%N)
  python3 -c "print(($end - $start) / 1e9)"
}

# Sync saves at steps 1..5 (keep_latest_k 1: older ones are deleted, as in a long run); the
# first save of a process also pays for fresh page-cache pages, so steps 2..5 are the steady
# state. Async saves every 4 steps (a save runs in the background while the next steps train).
run sync 6
run async 12 --set checkpoint.async_mode=async --set checkpoint.interval=4
# Loads from a cold cache: resume the latest save and train one more step.
for name in sync async; do
  latest="$out/$name/checkpoints/$(cat "$out/$name/checkpoints/latest")"
  drop_cache "$latest"/*.safetensors
  run "$name" $(( $(sed 's/step-0*//' "$out/$name/checkpoints/latest") + 1 ))
done
files=("$out/sync/checkpoints/$(cat "$out/sync/checkpoints/latest")"/*.safetensors)
bytes=$(cat "${files[@]}" | wc -c)
# dd: copy the same files (same bytes) with fsync, three times; read them from a cold cache, twice.
dd_write=() dd_read=()
for i in 1 2 3 4; do
  for f in "${files[@]}"; do cat "$f" >/dev/null; done
  dd_write+=("$(seconds_of bash -c "for f in ${files[*]}; do dd if=\$f of=$out/dd-\$(basename \$f) bs=1M conv=fsync status=none; done")")
  [ "$i" = 4 ] || rm -f "$out"/dd-*
done
# The HF export (fp32 weights: a third of the state) of the sync run's last steps, and dd of
# the same shard files.
hf_files=("$out/sync/checkpoints/hf-latest/"*.safetensors)
hf_bytes=$(cat "${hf_files[@]}" | wc -c)
dd_hf=()
for i in 1 2 3; do
  dd_hf+=("$(seconds_of bash -c "for f in ${hf_files[*]}; do dd if=\$f of=$out/ddhf-\$(basename \$f) bs=1M conv=fsync status=none; done")")
  rm -f "$out"/ddhf-*
done
for i in 1 2; do
  drop_cache "$out"/dd-*
  dd_read+=("$(seconds_of bash -c "for f in $out/dd-*; do dd if=\$f of=/dev/null bs=1M status=none; done")")
done

python3 - "$out" "$bytes" "$ranks" "${dd_write[*]}" "${dd_read[*]}" "$hf_bytes" "${dd_hf[*]}" <<'PY'
import re, statistics, sys
out, nbytes, ranks = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hf_bytes, dd_hf = int(sys.argv[6]), [float(x) for x in sys.argv[7].split()]
dd_write = [float(x) for x in sys.argv[4].split()]
dd_read = [float(x) for x in sys.argv[5].split()]
def saves(name):
    text = open(f"{out}/{name}.log").read()
    return re.findall(r"committed \S+step-(\d+) \(([\d.]+) MB on \d+ rank\(s\), ([\d.]+) s(?:, foreground ([\d.]+) s)?", text)
def loads(name):
    return [float(x) for x in re.findall(r"rank 0 read [\d.]+ MB in ([\d.]+) s", open(f"{out}/{name}.log").read())]
sync, asyn = saves("sync"), saves("async")
save_all = [float(s[2]) for s in sync[:6]]
stall_all = [float(s[3]) for s in asyn[:3]]
load_all = loads("sync") + loads("async")
gb = nbytes / 1e9
med = statistics.median
# Steady state: saves 3.. and dd trials 2.. reuse the page cache freed by deleting the previous
# copy (on this VM, writing into never-used memory costs about twice as much, for any writer).
save_s, stall_s, load_s = med(save_all[2:]), med(stall_all[1:]), med(load_all)
w, r = med(dd_write[1:]), med(dd_read)
fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
print(f"full training state: {gb:.3f} GB in {ranks} rank file(s); medians, every trial in brackets\n")
print("| operation | seconds | GB/s | ratio |")
print("| --- | ---: | ---: | ---: |")
print(f"| dd copy of the rank files + fsync, trials 2-4 [{fmt(dd_write)}] | {w:.2f} | {gb/w:.2f} | 1.00 |")
print(f"| sync save, steps 3-6 [{fmt(save_all)}] | {save_s:.2f} | {gb/save_s:.2f} | {w/save_s:.2f} of dd |")
print(f"| dd read, cold cache [{fmt(dd_read)}] | {r:.2f} | {gb/r:.2f} | 1.00 |")
print(f"| load, cold cache, checksums verified [{fmt(load_all)}] | {load_s:.2f} | {gb/load_s:.2f} | {r/load_s:.2f} of dd |")
print(f"| async save: foreground stall, saves 2-3 [{' / '.join(f'{x:.3f}' for x in stall_all)}] | {stall_s:.3f} | | {stall_s/save_s:.3f} of sync save |")
hf = [float(x) for x in re.findall(r"hf export: committed \S+ \([\d.]+ MB on \d+ rank\(s\), ([\d.]+) s", open(f"{out}/sync.log").read())]
if hf:
    hgb, hs, hd = hf_bytes / 1e9, med(hf), med(dd_hf)
    print(f"| dd copy of the HF shards + fsync [{fmt(dd_hf)}] | {hd:.2f} | {hgb/hd:.2f} | 1.00 |")
    print(f"| HF export, {hgb:.3f} GB fp32 weights incl. q/k permutation [{fmt(hf)}] | {hs:.2f} | {hgb/hs:.2f} | {hd/hs:.2f} of dd |")
def step_ms(name):
    return {int(a): float(b) for a, b in re.findall(r'"step":(\d+),.*?"step_ms":([\d.]+)', open(f"{out}/{name}/metrics.jsonl").read())}
a = step_ms("async")
before = [a[s] for s in (2, 3, 4) if s in a]               # no save yet: every intra-op thread
after = [a[s] for s in range(5, 13) if s in a]             # saves of steps 4 and 8 in flight
if before and after:
    print(f"| async: step time, steps 5-12 (saves writing) / steps 2-4 (none yet) | {med(after):.0f} / {med(before):.0f} ms | | {med(after)/med(before):.2f}x |")
PY
