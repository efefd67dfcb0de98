#!/usr/bin/env bash
# The GPU check: one command on a machine with one or more CUDA GPUs (a compiler, the CUDA
# toolkit, CMake, ninja and a Python with the CUDA PyTorch wheel; no Debian development
# packages and no network needed). It builds Strata and checks its CUDA path end to end:
#   ctest   the ctest tests labelled gpu (NCCL collectives and streams, FSDP prefetch and dropout
#           replay on the GPU, checkpoint staging from the GPU); a skip fails here
#   parity  configs/tiny.yaml's model, fp32, 20 steps on parallel.device=cpu and =cuda: every
#           step's loss within 1e-4 relative
#   bf16    the same 20 steps with parallel.fsdp.mixed_precision.param_dtype=bfloat16 on the GPU:
#           losses finite, falling (last 5 steps' mean >= 0.5 nats under the first 5's; 0.1 with
#           --cpu), each within 2% relative of the fp32 GPU run's
#   resume  on the GPU: 10 steps straight vs 5 + resume + 5: losses of steps 6-10 and the saved
#           step-10 state (every file's SHA-256) bit-identical
#   save    scripts/bench/checkpoint.sh with parallel.device=cuda: a ~100M model's full state
#           (1.2 GB) saved sync and async from the GPU against dd, and the async foreground stall
#   bench   a ~1B Llama (dim 2048, 16 layers, 32/8 heads, vocab 32000, seq 2048, bf16,
#           activation checkpointing auto) in Strata vs scripts/bench/reference_llama.py (PyTorch
#           eager: autocast bf16, SDPA, fused AdamW; and under torch.compile): tokens/s, MFU,
#           peak memory, Strata / eager and Strata / compile
# Each check prints one summary line (PASS, FAIL or SKIP, with its figures); the exit status is
# non-zero when one fails. Everything printed also goes to one log, gpu-check.log in $OUT when
# set, else in the build directory. docs/gpu.md describes the checks and their tolerances.
#
#   scripts/gpu/check.sh          # GPU machine: build into build-gpu/ (STRATA_BUILD_DIR), check
#   scripts/gpu/check.sh --cpu    # the same checks on CPU, small shapes, an existing build
#
# Build (GPU mode): when the system lacks the build's development headers, the .deb files in
# third_party/debs (scripts/gpu/fetch_debs.sh, run on a Debian machine) are unpacked into
# BUILD/deps with dpkg-deb -x and CMake, pkg-config, Open MPI and the loader are pointed there.
# Torch comes from the Python's torch package (torch.utils.cmake_prefix_path). Only the targets
# the checks run are built (strata, and those of gpu-labelled tests), with ninja -j$(nproc).
#
# --cpu: what each check compares on CPU, with a micro model (dim 64, 2 layers, seq 64):
#   parity  training.fused_kernels=false (ATen ops) vs true (Strata's fused CPU kernels), fp32
#   bf16    param_dtype bfloat16 on CPU vs the fp32 run
#   resume  exact resume on CPU; bench: the micro model, Strata vs the eager CPU reference
#   ctest   only lists the gpu-labelled tests (they need a GPU)
# It uses STRATA_BIN, else STRATA_BUILD_DIR/strata (default build/), and builds nothing.
#
# Options: --cpu; --no-build (GPU mode: use the build directory as it is).
# Environment: CHECKS (default "ctest parity bf16 resume bench"), STRATA_BUILD_DIR, STRATA_BIN
# (--cpu), STRATA_PYTHON (default third_party/pyenv/bin/python when present, else python3),
# STRATA_DEBS_DIR (third_party/debs), GPU_CHECK_USE_DEBS=1 (unpack and use the .debs even where
# the system has the headers), GPU_CHECK_LOG (the log file), GPU_CHECK_KEEP=1 (keep the
# work directory), BENCH_STEPS (GPU 12, CPU 12),
# BENCH_WARMUP (4), BENCH_COMPILE (GPU 1, CPU 0: the torch.compile row, left out when the
# check has already run GPU_CHECK_COMPILE_BY seconds, default 420), BENCH_GPUS (1: ranks,
# one per GPU, of the benchmark), PEAK_TFLOPS (MFU's peak when Strata logs none), CUDA_ARCH
# (TORCH_CUDA_ARCH_LIST for the build; default: the first GPU's compute capability).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
start_all=$SECONDS

mode=gpu build_step=1
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu ;;
    --no-build) build_step=0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$mode" = gpu ]; then
  build="${STRATA_BUILD_DIR:-$root/build-gpu}"
  bench_compile=${BENCH_COMPILE:-1}
else
  build="${STRATA_BUILD_DIR:-$root/build}"
  bench_compile=${BENCH_COMPILE:-0}
  build_step=0
fi
checks=${CHECKS:-ctest parity bf16 resume bench save}
bench_steps=${BENCH_STEPS:-12}
bench_warmup=${BENCH_WARMUP:-4}
bench_gpus=${BENCH_GPUS:-1}
if [ -n "${STRATA_PYTHON:-}" ]; then py=$STRATA_PYTHON
elif [ -x "$root/third_party/pyenv/bin/python" ]; then py="$root/third_party/pyenv/bin/python"
else py=python3; fi
debs="${STRATA_DEBS_DIR:-$root/third_party/debs}"
reference="$root/scripts/bench/reference_llama.py"
judge="$root/scripts/gpu/gpu_check.py"

mkdir -p "$build"
log="${GPU_CHECK_LOG:-${OUT:-$build}/gpu-check.log}"
mkdir -p "$(dirname "$log")"
: >"$log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
cleanup() {
  if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "check: work directory kept: $work"; else rm -rf "$work"; fi
  exec >&- 2>&-
  wait "$tee_pid" 2>/dev/null  # the log complete before the script returns
}
trap cleanup EXIT

say() { echo "check: $*"; }
declare -a summary=()
passed=0 failed=0 skipped=0
record() {  # NAME PASS|FAIL|SKIP DETAIL
  summary+=("gpu-check: $1: $2: $3")
  case "$2" in PASS) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
  echo "gpu-check: $1: $2: $3"
}
finish() {
  echo
  echo "=== summary ($mode mode, $((SECONDS - start_all)) s, log $log) ==="
  printf '%s\n' "${summary[@]}"
  echo "gpu-check: $passed passed, $failed failed, $skipped skipped"
  [ "$failed" -eq 0 ]
  exit $?
}
wanted() { [[ " $checks " == *" $1 "* ]]; }

if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
# Containers and VMs: no single-copy (CMA) transfers between ranks, no InfiniBand probing, and
# no remote shell needed (every rank is local).
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_btl='^openib'
if ! command -v ssh >/dev/null 2>&1 && ! command -v rsh >/dev/null 2>&1; then
  export OMPI_MCA_plm_rsh_agent=false
fi

say "mode $mode, build $build, python $py, checks: $checks"
"$py" -c 'import torch, yaml, numpy' ||
  { record setup FAIL "$py cannot import torch, yaml and numpy (set STRATA_PYTHON)"; finish; }

gpus=0
if [ "$mode" = gpu ]; then
  gpus=$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  [ "$gpus" -gt 0 ] || { record setup FAIL "PyTorch sees no CUDA GPU (use --cpu on a machine without one)"; finish; }
  device_name=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')
  say "$gpus GPU(s): $device_name; $("$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  if [ "$bench_gpus" -gt "$gpus" ]; then
    say "BENCH_GPUS=$bench_gpus but $gpus GPU(s) visible: the benchmark uses $gpus"
    bench_gpus=$gpus
  fi
fi

# ---------------------------------------------------------------------------------------------
# Dependencies and build (GPU mode)

# Unpacks the .debs into PREFIX when a header or tool the build needs is missing, and points
# PATH, pkg-config, Open MPI (OPAL_PREFIX, PMIX_INSTALL_PREFIX) and the loader at it.
deps_prefix=""
setup_deps() {
  local missing=() h
  for h in yaml-cpp/yaml.h fmt/core.h nlohmann/json.hpp CLI/CLI.hpp sentencepiece_processor.h \
      pcre2.h unicode/uchar.h curl/curl.h openssl/sha.h xxhash.h gtest/gtest.h; do
    [ -e "/usr/include/$h" ] || missing+=("$h")
  done
  command -v mpicxx >/dev/null 2>&1 || missing+=(mpicxx)
  command -v mpirun >/dev/null 2>&1 || missing+=(mpirun)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  [ "${GPU_CHECK_USE_DEBS:-0}" = 1 ] && missing+=("(GPU_CHECK_USE_DEBS=1)")
  if [ ${#missing[@]} -eq 0 ]; then
    say "build dependencies: the system's"
    return 0
  fi
  say "not on the system: ${missing[*]}; using the .deb files in $debs"
  compgen -G "$debs/*.deb" >/dev/null || {
    echo "check: no .deb files in $debs" >&2
    echo "HINT: run scripts/gpu/fetch_debs.sh on a Debian bookworm machine and bring third_party/debs along" >&2
    return 1
  }
  deps_prefix="$build/deps"
  local usr="$deps_prefix/usr" arch=x86_64-linux-gnu stamp
  stamp=$(ls -l "$debs"/*.deb | md5sum | cut -c1-16)
  if [ "$(cat "$deps_prefix/.complete" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$deps_prefix" && mkdir -p "$deps_prefix"
    local f
    for f in "$debs"/*.deb; do
      if command -v dpkg-deb >/dev/null 2>&1; then
        dpkg-deb -x "$f" "$deps_prefix" || return 1
      else  # no dpkg: a .deb is an ar archive holding data.tar.*
        local member
        member=$(ar t "$f" | grep '^data\.tar') || return 1
        ar p "$f" "$member" | tar -x -C "$deps_prefix" -f - --auto-compress 2>/dev/null ||
          ar p "$f" "$member" | tar -x -J -C "$deps_prefix" -f - || return 1
      fi
    done
    # pkg-config files name /usr: point them into the prefix.
    find "$deps_prefix" -name '*.pc' -exec sed -i -e "s#/usr/#$usr/#g" -e "s#=/usr\$#=$usr#" {} +
    # What Debian's alternatives would link (postinst scripts do not run here).
    local b
    for b in mpirun mpiexec mpicxx mpic++ mpicc; do
      [ -e "$usr/bin/$b.openmpi" ] && ln -sfn "$b.openmpi" "$usr/bin/$b"
    done
    [ -e "$usr/bin/pkg-config" ] || ln -sfn pkgconf "$usr/bin/pkg-config"
    mkdir -p "$usr/include/$arch"
    ln -sfn "../../lib/$arch/openmpi/include" "$usr/include/$arch/mpi"
    [ -e "$usr/lib/$arch/libmpi.so" ] || ln -sfn openmpi/lib/libmpi.so "$usr/lib/$arch/libmpi.so"
    [ -e "$usr/lib/$arch/libmpi_cxx.so" ] || ln -sfn openmpi/lib/libmpi_cxx.so "$usr/lib/$arch/libmpi_cxx.so"
    # The loader's directory: links to the shared libraries the system does not have itself
    # (by soname), so that a system copy always wins over the packaged one.
    mkdir -p "$deps_prefix/runtime-lib"
    local known lib soname
    known=$( { /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null; } | awk '{print $1}' | sort -u)
    while IFS= read -r lib; do
      soname=$(basename "$lib")
      if ! grep -qxF "$soname" <<<"$known"; then
        ln -sfn "$lib" "$deps_prefix/runtime-lib/$soname"
      fi
    done < <(find "$usr/lib/$arch" "$usr/lib/$arch/openmpi/lib" -maxdepth 1 -name 'lib*.so.*' | \
             grep -E '\.so\.[0-9]+$')
    echo "$stamp" >"$deps_prefix/.complete"
    say "unpacked $(ls "$debs"/*.deb | wc -l) packages into $deps_prefix ($(ls "$deps_prefix/runtime-lib" | wc -l) libraries the system lacks)"
  fi
  export PATH="$usr/bin:$PATH"
  export LD_LIBRARY_PATH="$deps_prefix/runtime-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PKG_CONFIG_PATH="$usr/lib/$arch/pkgconfig:$usr/share/pkgconfig:$usr/lib/$arch/openmpi/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  # Open MPI and PMIx find their plugins, help files and daemons (orted) relative to these
  # (PMIx's own configuration names its plugin directory absolutely: named here too).
  export OPAL_PREFIX="$usr" PMIX_PREFIX="$usr/lib/$arch/pmix2"
  export PMIX_MCA_mca_base_component_path="$usr/lib/$arch/pmix2/lib/pmix"
}

build_strata() {
  local torch_prefix arch_list
  torch_prefix=$("$py" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || return 1
  arch_list=${CUDA_ARCH:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')}
  local args=()
  if [ ! -f "$build/CMakeCache.txt" ]; then
    command -v ninja >/dev/null 2>&1 && args+=(-G Ninja)
  fi
  args+=(-DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$torch_prefix/Torch" -DTORCH_CUDA_ARCH_LIST="$arch_list")
  if [ -n "$deps_prefix" ]; then
    args+=(-DCMAKE_PREFIX_PATH="$deps_prefix/usr"
           -DMPI_CXX_COMPILER="$deps_prefix/usr/bin/mpicxx"
           -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$deps_prefix/runtime-lib -Wl,-rpath-link,$deps_prefix/usr/lib/x86_64-linux-gnu -Wl,-rpath-link,$deps_prefix/usr/lib/x86_64-linux-gnu/openmpi/lib")
    command -v pkg-config >/dev/null 2>&1 && args+=(-DPKG_CONFIG_EXECUTABLE="$(command -v pkg-config)")
  fi
  say "configure: cmake ${args[*]}"
  local t0=$SECONDS
  cmake -S "$root" -B "$build" "${args[@]}" >"$build/configure.log" 2>&1 ||
    { tail -40 "$build/configure.log"; echo "check: configure failed (log: $build/configure.log)"; return 1; }
  grep -E 'LibTorch|CUDA' "$build/configure.log" | head -3
  # The gpu-labelled tests' executables (paths under the build directory, also those named in
  # their environment), built with strata.
  local targets=(strata) t
  for t in $(ctest --test-dir "$build" -N -L gpu --show-only=json-v1 2>/dev/null | "$py" -c '
import json, os, sys
build = os.path.realpath(sys.argv[1])
try:
    tests = json.load(sys.stdin).get("tests", [])
except ValueError:
    tests = []
names = set()
for t in tests:
    words = list(t.get("command") or [])
    for p in t.get("properties", []):
        if p.get("name") == "ENVIRONMENT":
            words += [v.split("=", 1)[-1] for v in p.get("value", [])]
    for w in words:
        if os.path.realpath(w).startswith(build + "/") and os.sep in w:
            names.add(os.path.basename(w))
print(" ".join(sorted(names)))' "$build"); do
    targets+=("$t")
  done
  say "build: ${targets[*]} with $(nproc) jobs"
  cmake --build "$build" --parallel "$(nproc)" --target "${targets[@]}" >"$build/build.log" 2>&1 ||
    { grep -B2 -A12 -E 'error|FAILED' "$build/build.log" | head -60; echo "check: build failed (log: $build/build.log)"; return 1; }
  say "built in $((SECONDS - t0)) s"
}

if [ "$mode" = gpu ]; then
  setup_deps || { record build FAIL "build dependencies missing (see above)"; finish; }
  if [ "$build_step" = 1 ]; then
    build_strata || { record build FAIL "configure or build failed (see above)"; finish; }
  fi
  strata="$build/strata"
else
  strata="${STRATA_BIN:-$build/strata}"
  build="$(cd "$(dirname "$strata")" && pwd)"
fi
[ -x "$strata" ] || { record build FAIL "$strata not found (build first: scripts/build.sh)"; finish; }
say "binary: $strata"
"$strata" --version 2>&1 | sed 's/^/  /'

# ---------------------------------------------------------------------------------------------
# Runs

# The jobs: configs/tiny.yaml with the data replaced by a learnable token stream (a Markov chain
# of entropy ln 8, written by the reference's shard subcommand), no validation, logging every
# step. --cpu: a micro model.
if [ "$mode" = gpu ]; then
  shape=()
  train_device=(--set parallel.device=cuda)
  vocab=2048
  np_gpu=1
else
  shape=(model.vocab_size=512 model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2
         model.multiple_of=32 model.max_seq_len=64 data.seq_len=64 training.global_batch_size=8
         training.micro_batch_size=4)
  # On a CPU-only machine auto already means cpu; name it only where GPUs are visible.
  train_device=()
  if [ -e /dev/nvidia0 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    train_device=(--set parallel.device=cpu)
  fi
  vocab=512
fi
"$py" "$reference" shard "$work/markov.bin" --vocab-size "$vocab" --tokens 300000 --successors 8 --seed 1 ||
  { record setup FAIL "could not write the token shard"; finish; }

base=(--set data.train="$work/markov.bin" --set data.val=null --set data.tokenizer=null
      --set training.eval_interval=0 --set training.log_interval=1 --set training.steps=20
      --set lr_scheduler.warmup_steps=5 --set checkpoint.enable=false --set job.seed=1234)
for kv in "${shape[@]}"; do base+=(--set "$kv"); done

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# run NAME NP TIMEOUT [ARGS...]: `strata train configs/tiny.yaml` with the base overrides and ARGS
# on NP ranks, run directory $work/NAME, output in $work/NAME.log (its end printed on failure).
run() {
  local name=$1 np=$2 limit=$3; shift 3
  local dir="$work/$name" t0=$SECONDS rc
  timeout "$limit" mpirun --oversubscribe --bind-to none -np "$np" -x MASTER_ADDR=127.0.0.1 \
    -x MASTER_PORT="$(free_port)" "$strata" train --config configs/tiny.yaml "${base[@]}" \
    --set job.run_dir="$dir" "$@" >"$dir.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    say "$name failed (exit $rc$([ $rc -eq 124 ] && echo ", timed out after $limit s")); end of $dir.log:"
    tail -25 "$dir.log" | sed 's/^/  | /'
    return 1
  fi
  say "$name: $(grep -c '"loss"' "$dir/metrics.jsonl" 2>/dev/null || echo 0) steps logged in $((SECONDS - t0)) s"
  return 0
}
judge() { "$py" "$judge" "$@" 2>&1; }

# --- ctest -L gpu
if wanted ctest; then
  listed=$(ctest --test-dir "$build" -N -L gpu 2>/dev/null | sed -n 's/^Total Tests: //p')
  listed=${listed:-0}
  if [ "$mode" = cpu ]; then
    record ctest SKIP "$listed gpu-labelled test(s) listed, not run on CPU"
  elif [ "$listed" -eq 0 ]; then
    record ctest FAIL "no gpu-labelled tests listed (tests/CMakeLists.txt registers them)"
  else
    t0=$SECONDS
    if ctest --test-dir "$build" -L gpu --output-on-failure --timeout 300 >"$work/ctest.log" 2>&1; then
      if grep -q "(Skipped)" "$work/ctest.log"; then  # on a GPU machine a skip is a failure
        record ctest FAIL "skipped: $(grep "(Skipped)" "$work/ctest.log" | tr -s ' \n' ' ')"
      else
        record ctest PASS "$(grep -E 'tests passed' "$work/ctest.log" | tail -1) in $((SECONDS - t0)) s"
      fi
    else
      tail -40 "$work/ctest.log"
      record ctest FAIL "$(grep -E 'tests passed|tests failed' "$work/ctest.log" | tail -1)"
    fi
  fi
fi

# --- parity (and the fp32 run the bf16 check compares with)
fp32_run=""
if wanted parity || wanted bf16; then
  if [ "$mode" = gpu ]; then
    run parity-cpu 1 300 --set parallel.device=cpu; rc_a=$?
    run parity-cuda 1 300 "${train_device[@]}"; rc_b=$?
    what="CPU vs CUDA, fp32"
    a=parity-cpu b=parity-cuda
  else
    run parity-aten 1 120 "${train_device[@]}" --set training.fused_kernels=false; rc_a=$?
    run parity-fused 1 120 "${train_device[@]}" --set training.fused_kernels=true; rc_b=$?
    what="ATen ops vs fused CPU kernels (training.fused_kernels false/true), fp32, 1 rank"
    a=parity-aten b=parity-fused
  fi
  [ $rc_b -eq 0 ] && fp32_run=$b
  if wanted parity; then
    if [ $rc_a -ne 0 ] || [ $rc_b -ne 0 ]; then record parity FAIL "$what: a run failed (see above)"
    elif out=$(judge parity "$work/$a/metrics.jsonl" "$work/$b/metrics.jsonl" --steps 20 --rel 1e-4); then
      record parity PASS "$what: $out"
    else record parity FAIL "$what: $out"; fi
  fi
fi

# --- bf16
if wanted bf16; then
  run bf16 1 300 "${train_device[@]}" --set parallel.fsdp.mixed_precision.param_dtype=bfloat16; rc=$?
  what="param_dtype bfloat16 on $([ "$mode" = gpu ] && echo CUDA || echo CPU) vs the fp32 run"
  if [ $rc -ne 0 ]; then record bf16 FAIL "$what: the run failed (see above)"
  elif [ -z "$fp32_run" ]; then record bf16 FAIL "$what: no fp32 run to compare with"
  elif ! grep -q '^precision: parameters bfloat16' "$work/bf16.log"; then
    record bf16 FAIL "$what: the run did not compute in bfloat16 ($(grep -m1 '^precision: ' "$work/bf16.log"))"
  elif out=$(judge bf16 "$work/bf16/metrics.jsonl" "$work/$fp32_run/metrics.jsonl" --steps 20 --rel 0.02 \
      --drop "$([ "$mode" = gpu ] && echo 0.5 || echo 0.1)"); then
    record bf16 PASS "$what: $out"
  else record bf16 FAIL "$what: $out"; fi
fi

# --- resume: 10 steps straight vs 5 + resume + 5, the same command (as tests/e2e/checkpoint.sh)
if wanted resume; then
  ck=(--set training.steps=10 --set checkpoint.enable=true --set checkpoint.interval=5
      --set checkpoint.keep_latest_k=0 --set checkpoint.last_save_model_only=false
      --set checkpoint.async_mode=disabled "${train_device[@]}")
  what="$([ "$mode" = gpu ] && echo CUDA || echo CPU), fp32, 10 steps straight vs 5 + resume + 5"
  run resume-straight 1 300 "${ck[@]}"; rc=$?
  if [ $rc -ne 0 ]; then record resume FAIL "$what: the straight run failed"
  else
    mkdir -p "$work/resume-resumed/checkpoints"
    cp -r "$work/resume-straight/checkpoints/step-0000005" "$work/resume-resumed/checkpoints/"
    if ! run resume-resumed 1 300 "${ck[@]}"; then record resume FAIL "$what: the resumed run failed"
    elif ! grep -q "resume: loaded model, optimizer" "$work/resume-resumed.log"; then
      record resume FAIL "$what: the second run did not resume ($(grep -m1 'resume' "$work/resume-resumed.log" || echo 'no resume line'))"
    elif out=$(judge resume "$work/resume-straight/metrics.jsonl" "$work/resume-resumed/metrics.jsonl" --first 6 --last 10) &&
         out2=$(judge hashes "$work/resume-straight/checkpoints/step-0000010" "$work/resume-resumed/checkpoints/step-0000010"); then
      record resume PASS "$what: $out; step 10: $out2"
    else
      # Is the device run itself deterministic? Two straight runs tell a resume bug from
      # run-to-run nondeterminism (atomics in a kernel).
      detail="$out ${out2:-}"
      if run resume-again 1 300 "${ck[@]}"; then
        if again=$(judge resume "$work/resume-straight/metrics.jsonl" "$work/resume-again/metrics.jsonl" --first 1 --last 10); then
          detail="$detail (two straight runs are bit-identical: the difference is the resume's)"
        else
          detail="$detail (two straight runs differ too: the training is not deterministic: $again)"
        fi
      fi
      record resume FAIL "$what: $detail"
    fi
  fi
fi

# --- bench
if wanted bench; then
  if [ "$mode" = gpu ]; then
    bshape=(model.vocab_size=32000 model.dim=2048 model.n_layers=16 model.n_heads=32 model.n_kv_heads=8
            model.multiple_of=256 model.max_seq_len=2048 data.seq_len=2048
            training.global_batch_size=$((8 * bench_gpus)) training.micro_batch_size=4
            parallel.device=cuda parallel.fsdp.mixed_precision.param_dtype=bfloat16
            parallel.fsdp.activation_checkpointing=auto)
    bvocab=32000 ranks=$bench_gpus ref_args=(--device cuda --dtype bfloat16) limit=300
  else
    bshape=("${shape[@]}" training.global_batch_size=16)
    bvocab=512 ranks=1 ref_args=() limit=180
  fi
  bset=()
  for kv in "${bshape[@]}"; do bset+=(--set "$kv"); done
  "$py" "$reference" shard "$work/uniform.bin" --vocab-size "$bvocab" --tokens 2000000 --seed 2
  # The resolved config: Strata runs it and the reference reads the same file.
  if ! "$strata" train --config configs/tiny.yaml "${base[@]}" --set data.train="$work/uniform.bin" \
      --set training.steps="$bench_steps" --set lr_scheduler.warmup_steps=2 "${bset[@]}" \
      --set parallel.threads_per_rank=$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 )) \
      --print-config >"$work/bench.yaml" 2>"$work/bench-config.log"; then
    cat "$work/bench-config.log"; record bench FAIL "the benchmark config was refused"
  else
    cp "$work/bench.yaml" "$work/bench-strata.yaml"
    t0=$SECONDS
    bench_ok=1
    if timeout "$limit" mpirun --oversubscribe --bind-to none -np "$ranks" -x MASTER_ADDR=127.0.0.1 \
        -x MASTER_PORT="$(free_port)" "$strata" train --config "$work/bench.yaml" \
        --set job.run_dir="$work/bench-strata" >"$work/bench-strata.log" 2>&1; then
      say "bench: Strata $((SECONDS - t0)) s $(grep -m1 -oE 'activation_checkpointing auto -> [a-z]+' "$work/bench-strata.log" || true)"
    else
      tail -25 "$work/bench-strata.log" | sed 's/^/  | /'; bench_ok=0
    fi
    refs=(eager)
    [ "$bench_compile" = 1 ] && refs+=(compiled)
    for r in "${refs[@]}"; do
      t0=$SECONDS
      if [ "$r" = compiled ] && [ $((SECONDS - start_all)) -gt "${GPU_CHECK_COMPILE_BY:-420}" ]; then
        # The whole check is meant to fit in 10 minutes; compiling takes one or two.
        say "bench: $((SECONDS - start_all)) s spent: the torch.compile row is left out (GPU_CHECK_COMPILE_BY)"
        bench_compile=0
        continue
      fi
      extra=()
      [ "$r" = compiled ] && extra=(--compile)
      # The reference's OpenMP pool sized like its intra-op threads (as torchrun does).
      if OMP_NUM_THREADS=$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 )) timeout "$limit" \
          mpirun --oversubscribe --bind-to none -np "$ranks" -x MASTER_ADDR=127.0.0.1 \
          -x MASTER_PORT="$(free_port)" -x OMP_NUM_THREADS "$py" "$reference" train "$work/bench.yaml" \
          --metrics "$work/bench-$r.jsonl" "${ref_args[@]}" "${extra[@]}" >"$work/bench-$r.log" 2>&1; then
        say "bench: reference $r $((SECONDS - t0)) s"
      else
        tail -25 "$work/bench-$r.log" | sed 's/^/  | /'; bench_ok=0
      fi
    done
    compiled=()
    [ "$bench_compile" = 1 ] && compiled=(--compiled "$work/bench-compiled.jsonl")
    touch "$work/bench-strata/metrics.jsonl" "$work/bench-eager.jsonl" "$work/bench-compiled.jsonl" 2>/dev/null
    if table=$(judge bench --config "$work/bench.yaml" --warmup "$bench_warmup" \
        --strata "$work/bench-strata/metrics.jsonl" --eager "$work/bench-eager.jsonl" "${compiled[@]}" \
        --peak-tflops "${PEAK_TFLOPS:-0}" --device-name "${device_name:-}") && [ $bench_ok = 1 ]; then
      echo "$table"
      record bench PASS "$(sed -n 's/^BENCH //p' <<<"$table") ($bench_steps steps, first $bench_warmup left out$([ "$mode" = gpu ] && echo ", $ranks GPU(s)"))"
    else
      echo "$table"
      record bench FAIL "a run failed or logged no measured step: $(tail -1 <<<"$table")"
    fi
  fi
fi

# --- save: checkpoints from the GPU against dd (scripts/bench/checkpoint.sh on the device)
if wanted save; then
  if [ "$mode" = cpu ]; then
    record save SKIP "GPU only: scripts/bench/checkpoint.sh measures CPU saves (BENCHMARKS.md)"
  else
    "$py" "$reference" shard "$work/ckpt.bin" --vocab-size 8192 --tokens 200000 --seed 3
    t0=$SECONDS
    if CHECKPOINT_SET="parallel.device=cuda data.train=$work/ckpt.bin data.val=null data.tokenizer=null" \
        BENCH_DIR="$work" STRATA_BUILD_DIR="$(dirname "$strata")" timeout 180 \
        "$root/scripts/bench/checkpoint.sh" 1 >"$work/save.log" 2>&1; then
      cat "$work/save.log"
      save=$(sed -n 's/^| sync save.*| \([0-9.]*\) of dd |$/\1/p' "$work/save.log")
      stall=$(sed -n 's/^| async save: foreground stall.*| \([0-9.]*\) of sync save |$/\1/p' "$work/save.log")
      record save PASS "sync save ${save:-?} of dd (goal >= 0.8), async stall ${stall:-?} of a sync save (goal < 0.05), $((SECONDS - t0)) s"
    else
      tail -30 "$work/save.log"
      record save FAIL "scripts/bench/checkpoint.sh on the GPU failed (see above)"
    fi
  fi
fi

finish
