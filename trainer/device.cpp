// Device and backend choice, device facts for the log and the metrics. CUDA calls are compiled
// with STRATA_WITH_CUDA (trainer/CMakeLists.txt gives this file the CUDA include directories);
// without it a CUDA device cannot be in use, and the CUDA branches are not reached.
#include "trainer/device.h"

#include <ATen/ATen.h>
#include <ATen/SDPBackend.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <optional>

#include "trainer/errors.h"
#include "trainer/kernels/fused_ops.h"
#include "trainer/memory_estimate.h"
#include "trainer/metrics.h"

#ifdef STRATA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace strata {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

[[noreturn]] void throw_no_cuda_build(const at::Device& device) {
  throw ConfigError(
      fmt::format("device {} needs a CUDA build of Strata (LibTorch with CUDA)", device.str()));
}

}  // namespace

at::Device resolve_device(const std::string& wanted, int local_rank, int local_world_size,
                          int visible_gpus) {
  if (wanted != "auto" && wanted != "cpu" && wanted != "cuda") {
    throw ConfigError(fmt::format("parallel.device: '{}' is not one of auto, cpu, cuda", wanted));
  }
  if (wanted == "cpu" || (wanted == "auto" && visible_gpus <= 0)) return at::Device(at::kCPU);
  if (visible_gpus <= 0) {
    throw ConfigError(
        "parallel.device is cuda, but this process sees no CUDA GPU\nHINT: set "
        "parallel.device: cpu (or auto) to train on the CPU, or check CUDA_VISIBLE_DEVICES and "
        "the NVIDIA driver (nvidia-smi; `strata --version` shows what CUDA reports)");
  }
  if (local_world_size > visible_gpus) {
    throw ConfigError(fmt::format(
        "parallel.device{}: {} ranks run on this node but it has {} visible GPU{}: each rank "
        "needs a GPU of its own\nHINT: launch at most {} rank{} per node (mpirun -np / "
        "--map-by ppr:{}:node, srun --ntasks-per-node={}), or set parallel.device: cpu",
        wanted == "auto" ? " auto -> cuda" : " cuda", local_world_size, visible_gpus,
        visible_gpus == 1 ? "" : "s", visible_gpus, visible_gpus == 1 ? "" : "s", visible_gpus,
        visible_gpus));
  }
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
}

std::string resolve_backend(const std::string& wanted, const at::Device& device) {
  if (wanted != "auto" && wanted != "mpi" && wanted != "nccl") {
    throw ConfigError(fmt::format("parallel.backend: '{}' is not one of auto, mpi, nccl", wanted));
  }
  if (wanted == "auto") return device.is_cuda() ? "nccl" : "mpi";
  if (wanted == "nccl" && !device.is_cuda()) {
    throw ConfigError(
        "parallel.backend is nccl, but the device is the CPU: NCCL moves GPU memory only\nHINT: "
        "set parallel.backend: auto (mpi on the CPU), or parallel.device: cuda on GPUs");
  }
  if (wanted == "mpi" && device.is_cuda()) {
    throw ConfigError(
        "parallel.backend is mpi, but the device is cuda: Strata's MPI collectives take CPU "
        "tensors\nHINT: set parallel.backend: auto (nccl on GPUs), or parallel.device: cpu");
  }
  return wanted;
}

double default_peak_tflops(const std::string& device_name, at::ScalarType compute_dtype) {
  // Dense tensor-core TFLOP/s from NVIDIA's data sheets (their headline figures are with 2:4
  // sparsity, twice these). First match wins: the specific names before the general ones.
  struct Entry {
    const char* name;
    double half, tf32;  // bf16/fp16, and fp32 matmuls on TF32
  };
  static constexpr std::array<Entry, 6> table{{
      {"H200", 989.0, 494.0},
      {"H100 PCIe", 756.0, 378.0},
      {"H100 NVL", 0.0, 0.0},  // not in the table (another clock and power limit)
      {"H100", 989.0, 494.0},  // SXM5 ("NVIDIA H100 80GB HBM3")
      {"A100", 312.0, 156.0},  // SXM4 and PCIe alike
      {"L40S", 362.0, 183.0},
  }};
  for (const Entry& e : table) {
    if (device_name.find(e.name) == std::string::npos) continue;
    switch (compute_dtype) {
      case at::kBFloat16:
      case at::kHalf:
        return e.half;
      case at::kFloat:
        return e.tf32;
      default:
        return 0.0;
    }
  }
  return 0.0;
}

std::string device_name(const at::Device& device) {
  if (device.is_cpu()) return "cpu";
#ifdef STRATA_WITH_CUDA
  if (device.is_cuda()) return at::cuda::getDeviceProperties(device.index())->name;
#endif
  return device.str();
}

DeviceMemory device_memory(const at::Device& device) {
  if (device.is_cpu()) {
    // Two sources (statm now, getrusage's high-water mark, updated lazily): the peak is at
    // least the present.
    const double now = resident_memory_mb();
    return {now, std::max(now, peak_resident_memory_mb())};
  }
#ifdef STRATA_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return {static_cast<double>(stats.allocated_bytes[all].peak) / kMiB,
            static_cast<double>(stats.reserved_bytes[all].peak) / kMiB};
  }
#endif
  throw_no_cuda_build(device);
}

double free_memory_bytes(const at::Device& device, int local_ranks) {
  if (device.is_cpu()) {
    const std::optional<AvailableMemory> available = available_memory();
    return available ? static_cast<double>(available->bytes) / std::max(1, local_ranks) : 0.0;
  }
#ifdef STRATA_WITH_CUDA
  if (device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device.index());
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0.0;
    return static_cast<double>(free);
  }
#endif
  throw_no_cuda_build(device);
}

void reset_peak_memory(const at::Device& device) {
  if (device.is_cpu()) return;
#ifdef STRATA_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
    return;
  }
#endif
  throw_no_cuda_build(device);
}

std::string attention_backend(const at::Device& device, at::ScalarType dtype, bool document_masking,
                              int64_t head_dim, int64_t n_heads, int64_t n_kv_heads) {
  const at::TensorOptions options = at::TensorOptions().dtype(dtype).device(device);
  // The model's own kernel: Llama::attention's condition.
  if (!document_masking && fused::has_blas() && fused::enabled(at::empty({0}, options))) {
    return "fused CPU kernel";
  }
  // The call the model makes, on a short sequence: q, k, v (B, H, T, hd) as transposes of
  // (B, T, H, hd) projections, requiring grad as in training; packed documents pass a boolean
  // mask (B, 1, T, T) instead of is_causal.
  constexpr int64_t t = 64;
  const auto projection = [&](int64_t heads) {
    return at::zeros({1, t, heads, head_dim}, options).transpose(1, 2).requires_grad_(true);
  };
  const at::Tensor q = projection(n_heads), k = projection(n_kv_heads), v = projection(n_kv_heads);
  std::optional<at::Tensor> mask;
  if (document_masking) {
    mask = at::ones({1, 1, t, t}, options.dtype(at::kBool)).tril();
  }
  const std::string where = device.is_cuda() ? "ATen, CUDA" : "ATen, CPU";
  int64_t choice = 0;
  try {
    choice = at::_fused_sdp_choice(q, k, v, mask, /*dropout_p=*/0.0,
                                   /*is_causal=*/!document_masking, /*scale=*/std::nullopt,
                                   /*enable_gqa=*/n_kv_heads != n_heads);
  } catch (const std::exception& e) {
    std::string reason = e.what();
    reason = reason.substr(0, reason.find('\n'));
    return fmt::format("none ({}: {})", where, reason);
  }
  switch (static_cast<at::SDPBackend>(choice)) {
    case at::SDPBackend::flash_attention:
      return fmt::format("flash attention ({})", where);
    case at::SDPBackend::efficient_attention:
      return fmt::format("memory-efficient attention ({})", where);
    case at::SDPBackend::cudnn_attention:
      return fmt::format("cuDNN attention ({})", where);
    case at::SDPBackend::math:
      return fmt::format("math, unfused ({})", where);
    default:
      return fmt::format("backend {} ({})", choice, where);
  }
}

}  // namespace strata
