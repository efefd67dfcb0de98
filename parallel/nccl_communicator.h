// The NCCL backend of Communicator (CUDA tensors). Present in every build; without CUDA and
// NCCL at build time, make_nccl_communicator throws a DistributedError saying so.
#pragma once

#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace strata {

bool nccl_compiled();
int cuda_device_count();  // 0 without CUDA, a driver, or a GPU

// For `strata --version` and the start-up log, e.g. "runtime 13.0, NCCL 2.28.9, 1 GPU
// visible", "... 0 GPUs visible (CUDA driver version is insufficient ...)", or "not built"
// without CUDA. Never throws.
std::string cuda_description();

// One communicator over all ranks; this rank uses CUDA device `device` (its local rank).
std::unique_ptr<Communicator> make_nccl_communicator(const ProcessGroup& group, int device);

}  // namespace strata
