// The process's BLAS (see blas_kernels.h).
#include "trainer/kernels/blas.h"

#include <dlfcn.h>

namespace strata {

std::string blas_description() {
  // MKL's version query: void MKL_Get_Version_String(char* buffer, int length).
  using MklVersionFn = void (*)(char*, int);
  if (auto mkl = reinterpret_cast<MklVersionFn>(dlsym(RTLD_DEFAULT, "MKL_Get_Version_String"))) {
    char buffer[256] = {};
    mkl(buffer, sizeof(buffer) - 1);
    std::string text(buffer);
    while (!text.empty() && (text.back() == ' ' || text.back() == '\0')) text.pop_back();
    return text + " (LibTorch's)";
  }
  // A LibTorch built against OpenBLAS (e.g. some aarch64 builds).
  using OpenBlasFn = char* (*)();
  auto config = reinterpret_cast<OpenBlasFn>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  auto core = reinterpret_cast<OpenBlasFn>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  if (config && core) {
    // "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64": name and version.
    const std::string text = config();
    const size_t second_space = text.find(' ', text.find(' ') + 1);
    return text.substr(0, second_space) + " (" + core() + " kernels)";
  }
  return "LibTorch's BLAS (version unknown)";
}

}  // namespace strata
