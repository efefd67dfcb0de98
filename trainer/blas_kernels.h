// The BLAS kernels a run computes with. Debian's OpenBLAS (DYNAMIC_ARCH) picks its kernels from
// the CPU model at load time; on a CPU newer than its tables (e.g. Emerald Rapids under 0.3.21)
// it falls back to Prescott's SSE3 kernels, about 6x slower in fp32 GEMM than the AVX-512 ones
// the CPU can run. Strata then runs itself again with OPENBLAS_CORETYPE naming the kernels the
// CPU's instruction set supports. A user's OPENBLAS_CORETYPE is always left alone.
#pragma once

#include <string>

namespace strata {

struct CpuFeatures {
  bool avx2_fma = false;     // AVX2 + FMA3: OpenBLAS's Haswell kernels
  bool avx512 = false;       // AVX-512 F, CD, BW, DQ, VL: SkylakeX kernels
  bool avx512_bf16 = false;  // AVX-512 BF16: Cooperlake kernels
};

CpuFeatures detect_cpu_features();

// The OpenBLAS core to force instead of `current` (what openblas_get_corename() reports), or ""
// to keep it. Only cores without AVX2 kernels are replaced, and only on CPUs that can run better
// ones: a core OpenBLAS chose knowingly (Haswell, Zen, SkylakeX, ...) is never second-guessed.
std::string better_openblas_core(const std::string& current, const CpuFeatures& cpu);

// Before anything else in main (no threads, no MPI yet): when OPENBLAS_CORETYPE is unset, the
// BLAS is OpenBLAS and better_openblas_core names a core, re-executes this program (same
// arguments and environment, plus OPENBLAS_CORETYPE and STRATA_OPENBLAS_FALLBACK naming the
// replaced core). Returns when nothing is to be done or the exec fails (then with a warning).
void ensure_blas_kernels(char** argv);

// For the start-up log, e.g. "OpenBLAS 0.3.21, Cooperlake kernels (OpenBLAS fell back to
// Prescott on this CPU; Strata set OPENBLAS_CORETYPE=Cooperlake)".
std::string blas_description();

}  // namespace strata
