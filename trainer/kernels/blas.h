// Which BLAS the process computes its matrix products with: LibTorch's own (the PyTorch wheel
// links Intel MKL into libtorch_cpu and exports its Fortran interface, sgemm_ included, which the
// fused attention kernel calls). For the start-up log and `strata --version`.
#pragma once

#include <string>

namespace strata {

// e.g. "Intel(R) oneAPI Math Kernel Library Version 2024.2 ... (LibTorch's)", "OpenBLAS 0.3.21
// (Haswell kernels)", or "LibTorch's BLAS (version unknown)" when it exports neither query.
std::string blas_description();

}  // namespace strata
