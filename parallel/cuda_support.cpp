// CUDA pieces of the parallel layer (see cuda_support.h).
#include "parallel/cuda_support.h"

#include <mutex>

#include "parallel/errors.h"

#ifdef STRATA_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

namespace strata::detail {

#ifdef STRATA_WITH_CUDA

at::Tensor cuda_rng_state(const at::Device& device) {
  at::Generator generator = at::cuda::detail::getDefaultCUDAGenerator(device.index());
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void set_cuda_rng_state(const at::Device& device, const at::Tensor& state) {
  at::Generator generator = at::cuda::detail::getDefaultCUDAGenerator(device.index());
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

#else  // !STRATA_WITH_CUDA

at::Tensor cuda_rng_state(const at::Device& device) {
  throw DistributedError("this strata was built without CUDA: no generator on " + device.str());
}

void set_cuda_rng_state(const at::Device& device, const at::Tensor&) {
  throw DistributedError("this strata was built without CUDA: no generator on " + device.str());
}

#endif

}  // namespace strata::detail
