// The NCCL backend of Communicator, for CUDA tensors (compiled when the CUDA toolkit and NCCL
// are found: STRATA_WITH_CUDA). The ncclUniqueId travels over MPI; collectives run on the
// communicator's own stream, ordered after the compute stream's pending work with one event
// and before its later work with another, so callers see the usual stream semantics.
// Agreement (a host-side decision) goes over MPI.
#include "parallel/nccl_communicator.h"

#include <fmt/format.h>

#ifdef STRATA_WITH_CUDA
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

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
 public:
  NcclCommunicator(const ProcessGroup& group, int device)
      : rank_(group.rank()), world_size_(group.world_size()), host_(make_mpi_communicator(group)) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id;
    if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    detail::check_mpi(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD),
                      "MPI_Bcast(ncclUniqueId)");
    check_nccl(ncclCommInitRank(&comm_, world_size_, id, rank_), "ncclCommInitRank");
    create_stream();
  }
  // A part of another communicator: `comm` from ncclCommSplit, `host` the matching MPI split.
  NcclCommunicator(ncclComm_t comm, std::unique_ptr<Communicator> host)
      : rank_(host->rank()), world_size_(host->world_size()), host_(std::move(host)), comm_(comm) {
    create_stream();
  }
  ~NcclCommunicator() override {
    cudaEventDestroy(outputs_ready_);
    cudaEventDestroy(inputs_ready_);
    cudaStreamDestroy(stream_);
    ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    require_cuda(t, "all_reduce");
    enqueue(2.0 * ring(t), [&] {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()),
                           nccl_op(op), comm_, stream_);
    });
  }
  void all_gather(const at::Tensor& input, at::Tensor& output) override {
    require_cuda(input, "all_gather");
    require_cuda(output, "all_gather");
    require(output.numel() == input.numel() * world_size_, "all_gather");
    enqueue(ring(output), [&] {
      return ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(),
                           nccl_type(input.scalar_type()), comm_, stream_);
    });
  }
  void reduce_scatter(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    require_cuda(input, "reduce_scatter");
    require_cuda(output, "reduce_scatter");
    require(input.numel() == output.numel() * world_size_, "reduce_scatter");
    enqueue(ring(input), [&] {
      return ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(),
                               nccl_type(input.scalar_type()), nccl_op(op), comm_, stream_);
    });
  }
  void broadcast(at::Tensor& t, int root) override {
    require_cuda(t, "broadcast");
    enqueue(static_cast<double>(t.nbytes()), [&] {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()), root,
                           comm_, stream_);
    });
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
    return std::make_unique<NcclCommunicator>(part, std::move(host));
  }
  // Time is not measured here: the host only enqueues. Bytes and calls are exact.
  CommStats stats() const override { return stats_; }

 private:
  void create_stream() {
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaEventCreateWithFlags(&inputs_ready_, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventCreateWithFlags(&outputs_ready_, cudaEventDisableTiming),
               "cudaEventCreate");
  }
  template <class Launch>
  void enqueue(double ring_bytes, Launch launch) {
    // The legacy default stream is where LibTorch computes unless told otherwise.
    check_cuda(cudaEventRecord(inputs_ready_, cudaStreamLegacy), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(stream_, inputs_ready_, 0), "cudaStreamWaitEvent");
    check_nccl(launch(), "NCCL collective");
    check_cuda(cudaEventRecord(outputs_ready_, stream_), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(cudaStreamLegacy, outputs_ready_, 0), "cudaStreamWaitEvent");
    stats_.bytes += ring_bytes;
    ++stats_.calls;
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
    if (!ok) throw DistributedError(fmt::format("{}: input and output sizes do not match", what));
  }

  int rank_, world_size_;
  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t inputs_ready_ = nullptr, outputs_ready_ = nullptr;
  CommStats stats_;
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
