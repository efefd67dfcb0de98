// Where the trainer computes: choosing the device and the collective backend from the config,
// and what the start-up log and the metrics say about the device (its name, its peak
// throughput for MFU, its memory, the attention kernel that will run).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace strata {

// parallel.device ("auto" | "cpu" | "cuda") for the rank with local rank `local_rank` of
// `local_world_size` ranks on its node, with `visible_gpus` CUDA devices visible
// (cuda_device_count()). auto: cuda when a GPU is visible, else cpu. On cuda each rank takes
// the GPU of its local rank. Throws ConfigError when cuda is asked for without a visible GPU,
// or when the node runs more ranks than it has GPUs. Pure: no CUDA call.
at::Device resolve_device(const std::string& wanted, int local_rank, int local_world_size,
                          int visible_gpus);

// parallel.backend ("auto" | "mpi" | "nccl") for `device`: auto is nccl on cuda, mpi on cpu.
// Throws ConfigError for nccl on cpu (NCCL moves GPU memory only) and for mpi on cuda (the MPI
// collectives take CPU tensors).
std::string resolve_backend(const std::string& wanted, const at::Device& device);

// Dense (no sparsity) peak tensor-core TFLOP/s of one GPU named `device_name` (a CUDA device
// name, e.g. "NVIDIA H100 80GB HBM3") for matmuls in `compute_dtype`: bf16 and fp16 at their
// peak, fp32 at the TF32 peak (the rate fp32 matmuls reach with TF32 allowed). 0 when the GPU
// is not in the table (MFU is then not reported unless logging.peak_tflops is set), and for
// "cpu".
double default_peak_tflops(const std::string& device_name, at::ScalarType compute_dtype);

// "cpu", or the CUDA device's name (cudaGetDeviceProperties).
std::string device_name(const at::Device& device);

struct DeviceMemory {
  // CUDA: the caching allocator's peak bytes in live tensors, and its peak bytes held from the
  // driver (what nvidia-smi shows, less the CUDA context), since reset_peak_memory, in MiB.
  // CPU: the resident set of the process now, and its peak resident set, in MiB.
  double peak_allocated_mb = 0.0;
  double peak_reserved_mb = 0.0;
};
DeviceMemory device_memory(const at::Device& device);
// The memory a rank may still fill on `device`, in bytes: on CUDA the device's free memory
// (cudaMemGetInfo); on CPU the machine's available memory (available_memory(),
// trainer/memory_estimate.h) divided among the `local_ranks` of the node. 0 when unknown.
double free_memory_bytes(const at::Device& device, int local_ranks);
// CUDA: starts the peaks of device_memory afresh (e.g. once per logging window). CPU: nothing.
void reset_peak_memory(const at::Device& device);

// The attention kernel the model's forward runs for `dtype` on `device`, for the start-up
// log: "fused CPU kernel" (the model's own, trainer/kernels: fp32 CPU, fused kernels on, BLAS
// present, no document masking), else what ATen's scaled_dot_product_attention dispatches to,
// asked of ATen itself (at::_fused_sdp_choice on small tensors of this device, dtype and head
// layout, with the boolean mask of document masking or is_causal, as the model calls it):
// "flash attention", "memory-efficient attention", "cuDNN attention" or "math (unfused)", with
// " (ATen, CPU)" or " (ATen, CUDA)". Call after fused::set_enabled. On CUDA it allocates a few
// KiB on the device.
std::string attention_backend(const at::Device& device, at::ScalarType dtype, bool document_masking,
                              int64_t head_dim, int64_t n_heads = 1, int64_t n_kv_heads = 1);

}  // namespace strata
