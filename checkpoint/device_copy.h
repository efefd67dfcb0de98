// Device-to-host copies that run behind the caller's back: a checkpoint's GPU pieces copied
// into pinned host buffers on a side CUDA stream while training goes on. CUDA code lives in
// device_copy.cpp (compiled with STRATA_WITH_CUDA); without CUDA only CPU tensors exist, and
// every copy is an ordinary synchronous one.
#pragma once

#include <ATen/Tensor.h>

#include <memory>

namespace strata {

// Whether host buffers for copies from `source` should be pinned (page-locked): `source` is
// on a CUDA device (then CUDA is present and pinned memory can be had).
bool wants_pinned_host_buffer(const at::Tensor& source);

// A batch of copies from device tensors into host tensors. copy() only enqueues: on a side
// stream of the source's device that first waits for the work already queued on the current
// stream (the values the copies must see), without blocking the host. After the last copy,
// record(); then copies_done() (any thread) blocks until the data is on the host, and
// order_after_copies() makes the current stream's later work (e.g. the optimizer step
// overwriting the sources) wait for the copies on the device, without blocking the host. The
// caching allocator is told that the side stream uses each source, so a source freed meanwhile
// is not reused before its copy finished.
class DeviceToHostCopies {
 public:
  DeviceToHostCopies();
  ~DeviceToHostCopies();
  DeviceToHostCopies(const DeviceToHostCopies&) = delete;
  DeviceToHostCopies& operator=(const DeviceToHostCopies&) = delete;

  // `host`: contiguous, on the CPU, as many elements of the same dtype as `source`
  // (pinned memory for an asynchronous copy). A CPU `source` is copied at once.
  void copy(const at::Tensor& source, at::Tensor& host);
  void record();
  void order_after_copies();
  void copies_done();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata
