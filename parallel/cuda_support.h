// CUDA pieces of the parallel layer that need CUDA headers, kept out of every header: they are
// compiled with STRATA_WITH_CUDA (parallel/CMakeLists.txt); in a build without CUDA they throw.
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

namespace strata::detail {

// The state of the default CUDA generator of `device` (a CUDA device), and setting it back:
// a recomputation replays the random draws of forward (dropout) on the GPU too.
at::Tensor cuda_rng_state(const at::Device& device);
void set_cuda_rng_state(const at::Device& device, const at::Tensor& state);

}  // namespace strata::detail
