// The NCCL backend of Communicator, for CUDA tensors (compiled when the CUDA toolkit and NCCL
// are found: STRATA_WITH_CUDA). The ncclUniqueId travels over MPI; collectives run on the
// communicator's own stream, ordered after the pending work of the caller's current torch CUDA
// stream with one event; their work's wait() makes the current stream wait on another (no
// host synchronisation), so callers see the usual stream semantics, and the *_async calls let
// compute queued before the wait overlap the collective. The caching allocator is told that
// the communication stream uses the tensors (recordStream), so a tensor freed on the compute
// stream is not reused before the collective is done. Agreement (a host-side decision) goes
// over MPI.
#include "parallel/nccl_communicator.h"

#include <fmt/format.h>

#ifdef STRATA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <initializer_list>
#include <mutex>
#include <utility>
#include <vector>

#include "parallel/mpi_check.h"
#endif

namespace strata {

#ifdef STRATA_WITH_CUDA
namespace {

void check_cuda(cudaError_t code, const char* what) {
  if (code != cudaSuccess) {
    throw DistributedError(fmt::format("{} failed: {}", what, cudaGetErrorString(code)));
  }
}

void check_nccl(ncclResult_t code, const char* what) {
  if (code != ncclSuccess) {
    throw DistributedError(fmt::format("{} failed: {}\nHINT: NCCL_DEBUG=INFO shows why", what,
                                       ncclGetErrorString(code)));
  }
}

ncclDataType_t nccl_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    case at::kByte:
      return ncclUint8;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    default:
      throw DistributedError(
          fmt::format("NCCL collectives do not support dtype {}", c10::toString(dtype)));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

class NcclCommunicator final : public Communicator {
  // A collective enqueued on the communication stream; `done_` is recorded after it.
  class Work final : public CommWork {
   public:
    Work(NcclCommunicator& comm, cudaEvent_t done) : comm_(comm), done_(done) {}
    ~Work() override { cudaEventDestroy(done_); }  // released once the event completes
    Work(const Work&) = delete;
    Work& operator=(const Work&) = delete;
    void wait() override { comm_.wait_for(done_); }

   private:
    NcclCommunicator& comm_;
    cudaEvent_t done_;
  };

 public:
  NcclCommunicator(const ProcessGroup& group, int device)
      : rank_(group.rank()),
        world_size_(group.world_size()),
        device_(static_cast<c10::DeviceIndex>(device)),
        host_(make_mpi_communicator(group)) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id;
    if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    detail::check_mpi(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD),
                      "MPI_Bcast(ncclUniqueId)");
    check_nccl(ncclCommInitRank(&comm_, world_size_, id, rank_), "ncclCommInitRank");
    create_stream();
  }
  // A part of another communicator: `comm` from ncclCommSplit, `host` the matching MPI split.
  NcclCommunicator(ncclComm_t comm, std::unique_ptr<Communicator> host, c10::DeviceIndex device)
      : rank_(host->rank()),
        world_size_(host->world_size()),
        device_(device),
        host_(std::move(host)),
        comm_(comm) {
    create_stream();
  }
  ~NcclCommunicator() override {
    for (auto [start, end] : timings_) {
      cudaEventDestroy(start);
      cudaEventDestroy(end);
    }
    for (cudaEvent_t event : free_timing_events_) cudaEventDestroy(event);
    cudaEventDestroy(inputs_ready_);
    cudaStreamDestroy(stream_);
    ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    require_cuda(t, "all_reduce");
    enqueue(2.0 * ring(t), {t}, [&] {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()),
                           nccl_op(op), comm_, stream_);
    })->wait();
  }
  void all_gather(const at::Tensor& input, at::Tensor& output) override {
    all_gather_async(input, output)->wait();
  }
  std::unique_ptr<CommWork> all_gather_async(const at::Tensor& input, at::Tensor& output) override {
    require_cuda(input, "all_gather");
    require_cuda(output, "all_gather");
    require(output.numel() == input.numel() * world_size_ &&
                output.scalar_type() == input.scalar_type(),
            "all_gather");
    return enqueue(ring(output), {input, output}, [&] {
      return ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(),
                           nccl_type(input.scalar_type()), comm_, stream_);
    });
  }
  void reduce_scatter(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    reduce_scatter_async(input, output, op)->wait();
  }
  std::unique_ptr<CommWork> reduce_scatter_async(const at::Tensor& input, at::Tensor& output,
                                                 ReduceOp op) override {
    require_cuda(input, "reduce_scatter");
    require_cuda(output, "reduce_scatter");
    require(input.numel() == output.numel() * world_size_ &&
                output.scalar_type() == input.scalar_type(),
            "reduce_scatter");
    return enqueue(ring(input), {input, output}, [&] {
      return ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(),
                               nccl_type(input.scalar_type()), nccl_op(op), comm_, stream_);
    });
  }
  void broadcast(at::Tensor& t, int root) override {
    require_cuda(t, "broadcast");
    enqueue(static_cast<double>(t.nbytes()), {t}, [&] {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()), root,
                           comm_, stream_);
    })->wait();
  }
  void barrier() override {
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    host_->barrier();
  }
  std::optional<RankFailure> agree(bool ok, const std::string& message) override {
    return host_->agree(ok, message);
  }
  std::vector<std::string> all_gather_strings(const std::string& text) override {
    return host_->all_gather_strings(text);
  }
  std::string broadcast_string(const std::string& text, int root) override {
    return host_->broadcast_string(text, root);
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    std::unique_ptr<Communicator> host = host_->split(color, key);
    ncclComm_t part = nullptr;
    check_nccl(ncclCommSplit(comm_, color, key, &part, nullptr), "ncclCommSplit");
    return std::make_unique<NcclCommunicator>(part, std::move(host), device_);
  }
  // Bytes and calls are exact; `seconds` is not measured (the host only enqueues). The
  // exposed time is resolved here from the timing events recorded around each wait: this
  // waits for those events (call it at log intervals, not per collective).
  CommStats stats() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    resolve_timings();
    return stats_;
  }

 private:
  void create_stream() {
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaEventCreateWithFlags(&inputs_ready_, cudaEventDisableTiming), "cudaEventCreate");
  }
  cudaStream_t compute_stream() const { return c10::cuda::getCurrentCUDAStream(device_).stream(); }
  // Enqueues `launch` on the communication stream after the current stream's pending work;
  // returns the work whose wait() orders the current stream after it.
  template <class Launch>
  std::unique_ptr<CommWork> enqueue(double ring_bytes, std::initializer_list<at::Tensor> tensors,
                                    Launch launch) {
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaEventRecord(inputs_ready_, compute_stream()), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(stream_, inputs_ready_, 0), "cudaStreamWaitEvent");
    check_nccl(launch(), "NCCL collective");
    const c10::cuda::CUDAStream comm_stream = c10::cuda::getStreamFromExternal(stream_, device_);
    for (const at::Tensor& t : tensors) {
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), comm_stream);
    }
    cudaEvent_t done = nullptr;
    check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    auto work = std::make_unique<Work>(*this, done);
    check_cuda(cudaEventRecord(done, stream_), "cudaEventRecord");
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.bytes += ring_bytes;
    ++stats_.calls;
    return work;
  }
  // The current stream waits for `done`, between two timing events: how long it stalled is
  // the collective's exposed time.
  void wait_for(cudaEvent_t done) {
    c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t compute = compute_stream();
    std::lock_guard<std::mutex> lock(mutex_);
    const cudaEvent_t start = timing_event(), end = timing_event();
    check_cuda(cudaEventRecord(start, compute), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(compute, done, 0), "cudaStreamWaitEvent");
    check_cuda(cudaEventRecord(end, compute), "cudaEventRecord");
    timings_.emplace_back(start, end);
    if (timings_.size() > kMaxTimings) resolve_timings();  // stats() not called for long
  }
  cudaEvent_t timing_event() {
    if (!free_timing_events_.empty()) {
      const cudaEvent_t event = free_timing_events_.back();
      free_timing_events_.pop_back();
      return event;
    }
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreate(&event), "cudaEventCreate");
    return event;
  }
  // Adds the elapsed time of every recorded pair to the exposed time (waits for the pairs).
  // Called with mutex_ held.
  void resolve_timings() const {
    for (auto [start, end] : timings_) {
      float ms = 0.f;
      if (cudaEventSynchronize(end) == cudaSuccess &&
          cudaEventElapsedTime(&ms, start, end) == cudaSuccess) {
        stats_.exposed_seconds += ms / 1e3;
      }
      free_timing_events_.push_back(start);
      free_timing_events_.push_back(end);
    }
    timings_.clear();
  }
  double ring(const at::Tensor& full) const {
    return static_cast<double>(full.nbytes()) * (world_size_ - 1) / world_size_;
  }
  static void require_cuda(const at::Tensor& t, const char* what) {
    if (!t.is_cuda() || !t.is_contiguous()) {
      throw DistributedError(
          fmt::format("{} needs a contiguous CUDA tensor for the NCCL "
                      "backend, got one on {}",
                      what, t.device().str()));
    }
  }
  static void require(bool ok, const char* what) {
    if (!ok) {
      throw DistributedError(
          fmt::format("{}: input and output sizes or dtypes do not match", what));
    }
  }

  static constexpr size_t kMaxTimings = 4096;
  int rank_, world_size_;
  c10::DeviceIndex device_;
  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t inputs_ready_ = nullptr;
  mutable std::mutex mutex_;  // stats and timing events (backward may run on another thread)
  mutable CommStats stats_;
  mutable std::vector<std::pair<cudaEvent_t, cudaEvent_t>> timings_;  // unresolved waits
  mutable std::vector<cudaEvent_t> free_timing_events_;
};

}  // namespace

bool nccl_compiled() {
  return true;
}

int cuda_device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

std::string cuda_description() {
  int runtime = 0, nccl = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  ncclGetVersion(&nccl);
  const cudaError_t devices = cudaGetDeviceCount(&count);
  // NCCL encodes its version as major * 10000 + minor * 100 + patch (since 2.9).
  std::string text = fmt::format("runtime {}.{}, NCCL {}.{}.{}, ", runtime / 1000,
                                 runtime % 1000 / 10, nccl / 10000, nccl % 10000 / 100, nccl % 100);
  if (devices != cudaSuccess)
    return text + fmt::format("0 GPUs visible ({})", cudaGetErrorString(devices));
  return text + fmt::format("{} GPU{} visible", count, count == 1 ? "" : "s");
}

std::unique_ptr<Communicator> make_nccl_communicator(const ProcessGroup& group, int device) {
  return std::make_unique<NcclCommunicator>(group, device);
}

#else  // !STRATA_WITH_CUDA

bool nccl_compiled() {
  return false;
}
int cuda_device_count() {
  return 0;
}
std::string cuda_description() {
  return "not built (LibTorch without CUDA)";
}

std::unique_ptr<Communicator> make_nccl_communicator(const ProcessGroup&, int) {
  throw DistributedError(
      "this strata was built without CUDA and NCCL\nHINT: build against a CUDA "
      "LibTorch (scripts/setup.sh installs one)");
}

#endif

}  // namespace strata
