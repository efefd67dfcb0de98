#!/usr/bin/env bash
# Downloads the Debian packages that Strata's CMake build needs into third_party/debs/, for a
# machine that has a compiler, CMake, ninja, CUDA and PyTorch but no Debian development packages
# and no network (a GPU machine: scripts/gpu/check.sh unpacks them into a prefix with
# dpkg-deb -x, no root and no dpkg database needed). Run on a development machine with Debian's
# apt (bookworm, the distribution the project builds on), network access and `apt-get update`
# done:
#   scripts/gpu/fetch_debs.sh          # then copy third_party/debs to the GPU machine
# What is downloaded:
#   - the development packages CMakeLists.txt finds (MPI, yaml-cpp, CLI11, fmt, nlohmann-json,
#     sentencepiece, PCRE2, ICU, libcurl, OpenSSL, xxHash, GoogleTest), without their own
#     development dependencies (libopenmpi-dev's libhwloc-dev, libevent-dev, ... are not needed
#     to compile or link against Open MPI);
#   - the runtime libraries those link against, with their library dependencies resolved
#     recursively (apt-cache depends --recurse), Open MPI's launcher (openmpi-bin: mpirun,
#     orted) and pkgconf (CMake's pkg_check_modules needs a pkg-config);
#   - minus the base system every Debian or Ubuntu image has (glibc, libstdc++, zlib, PAM, ...),
#     and the packages the build never loads (ssh, X11, hwloc/ibverbs plugins, installers).
# The directory holds a .gitignore (everything): the files travel to a device machine as a
# carried path, never in a commit. Prints the file count and total size; a device run carries at
# most 64 MiB with the working tree.
# Environment: STRATA_DEBS_DIR (third_party/debs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${STRATA_DEBS_DIR:-$root/third_party/debs}"

command -v apt-get >/dev/null && command -v apt-cache >/dev/null ||
  { echo "fetch_debs: needs Debian's apt-get and apt-cache" >&2; exit 1; }

# The build's development packages (scripts/setup.sh's list, less the toolchain and test tools).
dev=(libopenmpi-dev libyaml-cpp-dev libcli11-dev libfmt-dev nlohmann-json3-dev libsentencepiece-dev
     libpcre2-dev libicu-dev libcurl4-openssl-dev libssl-dev libxxhash-dev libgtest-dev libgmock-dev)
# Runtime roots: what the development packages' libraries and the launch need.
runtime=(libopenmpi3 openmpi-bin openmpi-common libyaml-cpp0.7 libfmt9 libsentencepiece0
         libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libicu72 libcurl4 libssl3
         libxxhash0 pkgconf pkgconf-bin libpkgconf3)
# Never downloaded: the base system of any Debian/Ubuntu image, and what the build never loads.
exclude='^(libc6|libc-bin|libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base|zlib1g|liblzma5|libzstd1|libbz2-1\.0|libcrypt1|libselinux1|libacl1|libattr1|libaudit1|libaudit-common|libcap-ng0|libcap2|libpam.*|libsemanage.*|libsepol2|libtinfo6|libmd0|libudev1|libuuid1|libcom-err2|libdb5\.3|libgmp10|libffi8|debconf|cdebconf|dpkg|tar|passwd|adduser|readline-common|libreadline8|install-info|libdebian-installer4|libnewt0\.52|libslang2|libtextwrap1|openssh-client|libfido2-1|libcbor0\.8|libedit2|libx11-.*|libx11-6|libxcb1|libxau6|libxdmcp6|libxext6|libxnvctrl0|libpciaccess0|ocl-icd-libopencl1|libhwloc-plugins|ibverbs-providers|libmunge2|libxml2|perl-base|debianutils|sensible-utils)$'

mapfile -t closure < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${runtime[@]}" | grep -v '^ ' | grep -v '<' | sort -u)
packages=("${dev[@]}")
for p in "${closure[@]}"; do
  [[ $p =~ $exclude ]] || packages+=("$p")
done

mkdir -p "$dest"
printf '*\n' >"$dest/.gitignore"
rm -f "$dest"/*.deb
echo "fetch_debs: downloading ${#packages[@]} packages into $dest"
# apt-get download writes into the current directory; as root, apt's sandbox user cannot write
# there (a harmless warning, the download runs unsandboxed).
(cd "$dest" && apt-get download -q "${packages[@]}" 2>&1 | grep -v 'sandbox\|^Get:' || true)
missing=()
for p in "${packages[@]}"; do
  compgen -G "$dest/${p}_*.deb" >/dev/null || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] ||
  { echo "fetch_debs: not downloaded: ${missing[*]} (apt-get update first?)" >&2; exit 1; }
printf '%s\n' "${packages[@]}" >"$dest/packages.txt"
count=$(ls "$dest"/*.deb | wc -l)
bytes=$(cat "$dest"/*.deb | wc -c)
echo "fetch_debs: $count .deb files, $bytes bytes ($(awk -v b="$bytes" 'BEGIN{printf "%.1f MiB", b/1048576}')) in $dest"
echo "fetch_debs: largest:"; ls -S "$dest"/*.deb | head -5 | xargs -n1 du -h | sed 's/^/  /'
