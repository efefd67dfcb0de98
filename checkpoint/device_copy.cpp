// DeviceToHostCopies: CUDA streams and events when built with CUDA (STRATA_WITH_CUDA, set for
// this file by checkpoint/CMakeLists.txt), plain copies otherwise.
#include "checkpoint/device_copy.h"

#include <ATen/ATen.h>

#include <vector>

#ifdef STRATA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace strata {

bool wants_pinned_host_buffer(const at::Tensor& source) {
  return source.is_cuda();
}

struct DeviceToHostCopies::Impl {
#ifdef STRATA_WITH_CUDA
  struct PerDevice {
    c10::DeviceIndex index;
    c10::cuda::CUDAStream side;
    at::cuda::CUDAEvent copied;  // recorded on `side` after the last copy
  };
  std::vector<PerDevice> devices;

  // The side stream of `index`, created on first use behind the current stream's queued work.
  PerDevice& on(c10::DeviceIndex index) {
    for (PerDevice& d : devices) {
      if (d.index == index) return d;
    }
    PerDevice& d = devices.emplace_back(
        PerDevice{index, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index), {}});
    at::cuda::CUDAEvent computed;
    computed.record(c10::cuda::getCurrentCUDAStream(index));
    computed.block(d.side);
    return d;
  }
#endif
};

DeviceToHostCopies::DeviceToHostCopies() : impl_(std::make_unique<Impl>()) {}
DeviceToHostCopies::~DeviceToHostCopies() = default;

void DeviceToHostCopies::copy(const at::Tensor& source, at::Tensor& host) {
#ifdef STRATA_WITH_CUDA
  if (source.is_cuda()) {
    Impl::PerDevice& d = impl_->on(source.device().index());
    {
      // On the side stream, the flattening of a strided source too (after the wait above).
      const c10::cuda::CUDAStreamGuard guard(d.side);
      host.copy_(source.detach().reshape({-1}), /*non_blocking=*/true);
    }
    // The source may be freed (a temporary of the caller's) before the copy ran: its memory
    // must not be handed out again until the side stream is past this point.
    if (source.storage().data_ptr().get() != nullptr) {
      c10::cuda::CUDACachingAllocator::recordStream(source.storage().data_ptr(), d.side);
    }
    return;
  }
#endif
  host.copy_(source.detach().reshape({-1}));
}

void DeviceToHostCopies::record() {
#ifdef STRATA_WITH_CUDA
  for (Impl::PerDevice& d : impl_->devices) d.copied.record(d.side);
#endif
}

void DeviceToHostCopies::order_after_copies() {
#ifdef STRATA_WITH_CUDA
  for (Impl::PerDevice& d : impl_->devices) {
    d.copied.block(c10::cuda::getCurrentCUDAStream(d.index));
  }
#endif
}

void DeviceToHostCopies::copies_done() {
#ifdef STRATA_WITH_CUDA
  for (const Impl::PerDevice& d : impl_->devices) d.copied.synchronize();
#endif
}

}  // namespace strata
