// OpenBLAS kernel selection (see blas_kernels.h).
#include "trainer/blas_kernels.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

namespace strata {
namespace {

// openblas_get_corename / openblas_get_config when the process's BLAS is OpenBLAS, else "".
std::string openblas_string(const char* symbol) {
  using Fn = char* (*)();
  auto fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, symbol));
  const char* s = fn ? fn() : nullptr;
  return s ? std::string(s) : std::string();
}

}  // namespace

CpuFeatures detect_cpu_features() {
  __builtin_cpu_init();
  CpuFeatures cpu;
  cpu.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  cpu.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl");
  cpu.avx512_bf16 = cpu.avx512 && __builtin_cpu_supports("avx512bf16");
  return cpu;
}

std::string better_openblas_core(const std::string& current, const CpuFeatures& cpu) {
  // OpenBLAS's x86-64 cores whose SGEMM kernels predate AVX2 (its generic fallbacks included).
  static const std::set<std::string> pre_avx2 = {
      "Katmai", "Coppermine", "Northwood", "Prescott", "Banias", "Core2", "Penryn",
      "Dunnington", "Nehalem", "Atom", "Athlon", "Opteron", "Opteron(SSE3)", "Barcelona",
      "Nano", "Bobcat", "Sandybridge", "Unknown"};
  if (current.empty() || !pre_avx2.count(current)) return "";
  if (cpu.avx512_bf16) return "Cooperlake";
  if (cpu.avx512) return "SkylakeX";
  if (cpu.avx2_fma) return "Haswell";
  return "";
}

void ensure_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE")) return;  // the user's choice (or ours, after the exec)
  const std::string current = openblas_string("openblas_get_corename");
  const std::string better = better_openblas_core(current, detect_cpu_features());
  if (better.empty()) return;
  setenv("OPENBLAS_CORETYPE", better.c_str(), 1);
  setenv("STRATA_OPENBLAS_FALLBACK", current.c_str(), 1);
  execv("/proc/self/exe", argv);
  std::fprintf(stderr,
               "strata: warning: could not restart with OPENBLAS_CORETYPE=%s (%s); computing "
               "with OpenBLAS's %s kernels, several times slower\nHINT: export "
               "OPENBLAS_CORETYPE=%s before starting strata\n",
               better.c_str(), std::strerror(errno), current.c_str(), better.c_str());
  unsetenv("OPENBLAS_CORETYPE");
  unsetenv("STRATA_OPENBLAS_FALLBACK");
}

std::string blas_description() {
  const std::string config = openblas_string("openblas_get_config");
  if (config.empty()) return "not OpenBLAS (kernels chosen by the BLAS library)";
  // "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64": name and version.
  const size_t second_space = config.find(' ', config.find(' ') + 1);
  std::string text = config.substr(0, second_space) + ", " + openblas_string("openblas_get_corename") + " kernels";
  const char* fallback = std::getenv("STRATA_OPENBLAS_FALLBACK");
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  if (fallback && forced) {
    text += std::string(" (OpenBLAS fell back to ") + fallback + " on this CPU; Strata set OPENBLAS_CORETYPE=" +
            forced + ")";
  } else if (forced) {
    text += std::string(" (OPENBLAS_CORETYPE=") + forced + ")";
  }
  return text;
}

}  // namespace strata
