// Device and backend choice (each refusal and its hint), the peak-TFLOP/s table, and what the
// CPU reports for the device's name, memory and attention kernel. The CUDA branches need a GPU
// and are not exercised here.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

#include "trainer/device.h"
#include "trainer/errors.h"
#include "trainer/kernels/fused_ops.h"

namespace strata {
namespace {

// The ConfigError message of `f`, or "" when it does not throw one.
template <class F>
std::string config_error(F f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(ResolveDevice, AutoTakesTheGpuOfTheLocalRankWhenThereIsOne) {
  EXPECT_EQ(resolve_device("auto", 0, 1, 0), at::Device(at::kCPU));
  EXPECT_EQ(resolve_device("auto", 0, 4, 0), at::Device(at::kCPU));
  EXPECT_EQ(resolve_device("auto", 0, 1, 1), at::Device(at::kCUDA, 0));
  EXPECT_EQ(resolve_device("auto", 3, 4, 8), at::Device(at::kCUDA, 3));
  EXPECT_EQ(resolve_device("cuda", 1, 2, 2), at::Device(at::kCUDA, 1));
  EXPECT_EQ(resolve_device("cpu", 1, 2, 8), at::Device(at::kCPU));
}

TEST(ResolveDevice, CudaWithoutAGpuSaysWhatToDo) {
  const std::string message = config_error([] { resolve_device("cuda", 0, 1, 0); });
  EXPECT_NE(message.find("parallel.device is cuda, but this process sees no CUDA GPU"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("HINT: set parallel.device: cpu"), std::string::npos) << message;
  EXPECT_NE(message.find("CUDA_VISIBLE_DEVICES"), std::string::npos) << message;
  EXPECT_NE(message.find("driver"), std::string::npos) << message;
}

TEST(ResolveDevice, MoreRanksThanGpusOnANodeNamesBothNumbers) {
  const std::string message = config_error([] { resolve_device("cuda", 0, 8, 4); });
  EXPECT_NE(message.find("8 ranks run on this node but it has 4 visible GPUs"), std::string::npos)
      << message;
  EXPECT_NE(message.find("HINT: launch at most 4 ranks per node"), std::string::npos) << message;
  const std::string automatic = config_error([] { resolve_device("auto", 1, 2, 1); });
  EXPECT_NE(automatic.find("parallel.device auto -> cuda: 2 ranks run on this node but it has 1 "
                           "visible GPU:"),
            std::string::npos)
      << automatic;
  EXPECT_NE(automatic.find("launch at most 1 rank per node"), std::string::npos) << automatic;
}

TEST(ResolveDevice, UnknownNamesAreRefused) {
  EXPECT_NE(config_error([] {
              resolve_device("gpu", 0, 1, 1);
            }).find("parallel.device: 'gpu' is not one of auto, cpu, cuda"),
            std::string::npos);
}

TEST(ResolveBackend, AutoFollowsTheDeviceAndMismatchesAreRefused) {
  const at::Device cpu(at::kCPU), gpu(at::kCUDA, 0);
  EXPECT_EQ(resolve_backend("auto", cpu), "mpi");
  EXPECT_EQ(resolve_backend("auto", gpu), "nccl");
  EXPECT_EQ(resolve_backend("mpi", cpu), "mpi");
  EXPECT_EQ(resolve_backend("nccl", gpu), "nccl");
  const std::string nccl_on_cpu = config_error([&] { resolve_backend("nccl", cpu); });
  EXPECT_NE(nccl_on_cpu.find("parallel.backend is nccl, but the device is the CPU"),
            std::string::npos)
      << nccl_on_cpu;
  EXPECT_NE(nccl_on_cpu.find("HINT: set parallel.backend: auto"), std::string::npos);
  const std::string mpi_on_gpu = config_error([&] { resolve_backend("mpi", gpu); });
  EXPECT_NE(mpi_on_gpu.find("parallel.backend is mpi, but the device is cuda"), std::string::npos)
      << mpi_on_gpu;
  EXPECT_NE(mpi_on_gpu.find("HINT: set parallel.backend: auto (nccl on GPUs)"), std::string::npos);
  EXPECT_NE(config_error([&] {
              resolve_backend("gloo", cpu);
            }).find("parallel.backend: 'gloo' is not one of auto, mpi, nccl"),
            std::string::npos);
}

TEST(DefaultPeakTflops, DenseFiguresByDeviceNameAndDtype) {
  struct Case {
    const char* name;
    at::ScalarType dtype;
    double tflops;
  };
  for (const Case& c : std::initializer_list<Case>{
           {"NVIDIA H100 80GB HBM3", at::kBFloat16, 989.0},
           {"NVIDIA H100 80GB HBM3", at::kFloat, 494.0},
           {"NVIDIA H200", at::kBFloat16, 989.0},
           {"NVIDIA H200", at::kHalf, 989.0},
           {"NVIDIA H100 PCIe", at::kBFloat16, 756.0},
           {"NVIDIA A100-SXM4-80GB", at::kBFloat16, 312.0},
           {"NVIDIA A100-PCIE-40GB", at::kFloat, 156.0},
           {"NVIDIA L40S", at::kBFloat16, 362.0},
           // Not in the table: MFU is not reported.
           {"NVIDIA H100 NVL", at::kBFloat16, 0.0},
           {"NVIDIA GeForce RTX 4090", at::kBFloat16, 0.0},
           {"NVIDIA H100 80GB HBM3", at::kDouble, 0.0},
           {"cpu", at::kFloat, 0.0},
       }) {
    EXPECT_EQ(default_peak_tflops(c.name, c.dtype), c.tflops) << c.name << " " << c.dtype;
  }
}

TEST(DeviceFacts, TheCpuReportsItsNameAndResidentMemory) {
  const at::Device cpu(at::kCPU);
  EXPECT_EQ(device_name(cpu), "cpu");
  reset_peak_memory(cpu);  // nothing to reset
  const DeviceMemory memory = device_memory(cpu);
  EXPECT_GT(memory.peak_allocated_mb, 1.0);
  EXPECT_GE(memory.peak_reserved_mb, memory.peak_allocated_mb);
}

TEST(AttentionBackend, TheCpuNamesTheFusedKernelOrWhatAtenRuns) {
  const at::Device cpu(at::kCPU);
  fused::set_enabled(true);
  if (fused::has_blas())
    EXPECT_EQ(attention_backend(cpu, at::kFloat, false, 64), "fused CPU kernel");
  auto is_aten_cpu = [](const std::string& what) {
    return (what == "flash attention (ATen, CPU)" || what == "math, unfused (ATen, CPU)");
  };
  // Packed documents, other dtypes and the fused kernels switched off take ATen's path.
  const std::string masked = attention_backend(cpu, at::kFloat, true, 64, 4, 2);
  EXPECT_TRUE(is_aten_cpu(masked)) << masked;
  const std::string bf16 = attention_backend(cpu, at::kBFloat16, false, 64);
  EXPECT_TRUE(is_aten_cpu(bf16)) << bf16;
  fused::set_enabled(false);
  const std::string unfused = attention_backend(cpu, at::kFloat, false, 64, 8, 8);
  fused::set_enabled(true);
  EXPECT_TRUE(is_aten_cpu(unfused)) << unfused;
  RecordProperty("masked", masked);  // in --gtest_output=xml, for a look at what ATen picks
  RecordProperty("bf16", bf16);
}

}  // namespace
}  // namespace strata
