#!/usr/bin/env bash
# Installs what Strata builds and runs with, idempotently:
#   1. Debian packages (toolchain, MPI, config/CLI/JSON/tokenizer/HTTP libraries, test tools);
#   2. the project-local Python environment holding the pinned PyTorch wheel (LibTorch for the
#      build, PyTorch for the benchmark reference), versions pinned in third_party/requirements.txt.
# The environment lives in the user's cache directory, keyed by the Python version and a hash of
# the requirements, and third_party/pyenv links to it: every clone on a machine shares one copy,
# and only a new machine (or a changed pin) installs it. Re-running is a no-op.
# Works as root or through sudo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

packages=(
  # toolchain
  build-essential cmake pkg-config python3 python3-venv
  # launch and CPU collectives
  libopenmpi-dev openmpi-bin
  # config, CLI, formatting, JSON, tokenizer, HTTP
  libyaml-cpp-dev libcli11-dev libfmt-dev nlohmann-json3-dev
  libsentencepiece-dev sentencepiece libpcre2-dev libicu-dev libcurl4-openssl-dev
  # checkpoint checksums (SHA-256, XXH3)
  libssl-dev libxxhash-dev
  # tests (clang's libFuzzer runtime: the safetensors header fuzz run)
  libgtest-dev libgmock-dev clang libclang-rt-14-dev
  # the Slurm tests (tests/slurm: a private cluster per test; srun's pmix plugin comes with
  # slurm-wlm-basic-plugins). The tests run their own daemons, never the system's: Debian's
  # slurmd and slurmctld services start only once /etc/slurm/slurm.conf exists.
  slurm-wlm munge
  # the formatting check of .ci/run (scripts/check_format.sh; the version pins the output)
  clang-format-14
  # default corpus (plain-text English) and the metrics plot script
  fortunes python3-matplotlib
)

install_debian_packages() {
  local missing=() p
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#packages[@]} Debian packages present"
    return
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "setup: missing packages: ${missing[*]}" >&2
      echo "HINT: run this script as root or install sudo" >&2
      exit 1
    fi
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Update the package lists once per run when they are absent or older than a day.
  local lists=/var/lib/apt/lists
  if [ -z "$(find "$lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    "${sudo[@]}" apt-get update -q
  fi
  if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    # A stale list can name versions the mirror no longer has: refresh once and retry.
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# The CUDA build of LibTorch needs the CUDA toolkit's CMake support and headers at build time
# (not a GPU). It is not a Debian package at the version the wheel is built for.
check_cuda_toolkit() {
  if [ -n "${CUDAToolkit_ROOT:-}" ] || command -v nvcc >/dev/null 2>&1 ||
     [ -x /usr/local/cuda/bin/nvcc ]; then
    return
  fi
  echo "setup: no CUDA toolkit found (nvcc is not on PATH and /usr/local/cuda/bin/nvcc is absent)" >&2
  echo "HINT: install the CUDA 13.0 toolkit (the version of the pinned torch wheel) or set" \
       "CUDAToolkit_ROOT; no GPU is needed to build or to run on CPU" >&2
  exit 1
}

install_python_env() {
  local requirements="$root/third_party/requirements.txt"
  local python="${STRATA_PYTHON:-python3}"
  local pyver hash torch_pin cache env
  pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  hash=$(sha256sum "$requirements" | cut -c1-10)
  torch_pin=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$requirements")
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/strata"
  env="$cache/pyenv-torch$torch_pin-py$pyver-$hash"
  mkdir -p "$cache"
  (
    # One installer at a time per machine: clones share the environment.
    flock 9
    if [ ! -f "$env/.strata-complete" ]; then
      rm -rf "$env"
      echo "setup: creating the Python environment $env"
      echo "setup: installing $(grep -v '^#' "$requirements" | xargs) with their dependencies" \
           "(the CUDA wheels: about 3 GB to download, 4.7 GB on disk)"
      local start=$SECONDS
      "$python" -m venv "$env"
      "$env/bin/python" -m pip install --no-input --disable-pip-version-check \
        --progress-bar off -r "$requirements"
      "$env/bin/python" -m pip freeze --all > "$env/.strata-freeze"
      touch "$env/.strata-complete"
      echo "setup: Python environment ready in $((SECONDS - start)) s ($(du -sh "$env" | cut -f1))"
    else
      echo "setup: Python environment present ($env)"
    fi
  ) 9>"$cache/.setup.lock"
  ln -sfn "$env" "$root/third_party/pyenv"
}

install_debian_packages
check_cuda_toolkit
install_python_env
echo "setup: done"
