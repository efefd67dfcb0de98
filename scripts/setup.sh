#!/usr/bin/env bash
# Installs the Debian packages Strata builds and runs with. Idempotent: packages already
# installed are skipped, `apt-get update` runs at most once and only when something is missing.
# Works as root or through sudo.
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake pkg-config
  # tensors + a fast BLAS behind Debian's generic libblas.so.3 (reference BLAS is ~12x slower)
  libtorch-dev libopenblas0-openmp
  # launch and CPU collectives
  libopenmpi-dev openmpi-bin
  # config, CLI, formatting, JSON, tokenizer, HTTP
  libyaml-cpp-dev libcli11-dev libfmt-dev nlohmann-json3-dev
  libsentencepiece-dev sentencepiece libcurl4-openssl-dev
  # checkpoint checksums (SHA-256, XXH3)
  libssl-dev libxxhash-dev
  # tests (clang's libFuzzer runtime: the safetensors header fuzz run)
  libgtest-dev libgmock-dev clang libclang-rt-14-dev
  # default corpus (plain-text English) and the metrics plot script
  fortunes python3-matplotlib
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "setup: missing packages: ${missing[*]}" >&2
  echo "HINT: run this script as root or install sudo" >&2
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Update the package lists once per run when they are absent or older than a day.
lists=/var/lib/apt/lists
if [ -z "$(find "$lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
  "${sudo[@]}" apt-get update -q
fi
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  # A stale list can name versions the mirror no longer has: refresh once and retry.
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "setup: done"
