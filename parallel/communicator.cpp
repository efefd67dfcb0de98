// The MPI backend of Communicator.
#include "parallel/communicator.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <vector>

#include "parallel/mpi_check.h"

namespace strata {
namespace {

using detail::check_mpi;

MPI_Datatype mpi_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kInt:
      return MPI_INT32_T;
    case at::kLong:
      return MPI_INT64_T;
    case at::kByte:
      return MPI_UINT8_T;
    case at::kBFloat16:
    case at::kHalf:
      return MPI_UINT16_T;  // moved as bits; reduced in fp32 (see below)
    default:
      throw DistributedError(
          fmt::format("MPI collectives do not support dtype {}", c10::toString(dtype)));
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

int mpi_count(int64_t numel, const char* what) {
  if (numel > INT_MAX) {
    throw DistributedError(
        fmt::format("{}: {} elements exceed MPI's count limit of {}", what, numel, INT_MAX));
  }
  return static_cast<int>(numel);
}

void require_cpu_contiguous(const at::Tensor& t, const char* what) {
  if (!t.device().is_cpu() || !t.is_contiguous()) {
    throw DistributedError(fmt::format(
        "{} needs a contiguous CPU tensor for the MPI backend, got "
        "{} on {}",
        what, t.is_contiguous() ? "a contiguous tensor" : "a strided tensor", t.device().str()));
  }
}

bool is_half_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

class MpiCommunicator final : public Communicator {
  // Adds one collective's time and ring traffic to the stats.
  class Timed {
   public:
    Timed(CommStats& stats, double ring_bytes) : stats_(stats), bytes_(ring_bytes) {}
    ~Timed() {
      const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
      stats_.seconds += seconds;
      stats_.exposed_seconds += seconds;  // synchronous: nothing overlaps it
      stats_.bytes += bytes_;
      ++stats_.calls;
    }

   private:
    using Clock = std::chrono::steady_clock;
    CommStats& stats_;
    double bytes_;
    Clock::time_point start_ = Clock::now();
  };

  double ring(const at::Tensor& full) const {
    return static_cast<double>(full.nbytes()) * (world_size_ - 1) / world_size_;
  }

 public:
  // Over MPI_COMM_WORLD (not owned), or over a communicator made by split (owned).
  MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &world_size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  void all_reduce(at::Tensor& tensor, ReduceOp op) override {
    require_cpu_contiguous(tensor, "all_reduce");
    if (is_half_precision(tensor)) {
      // MPI has no 16-bit float arithmetic: reduce in fp32, round once at the end.
      at::Tensor wide = tensor.to(at::kFloat);
      all_reduce(wide, op);
      tensor.copy_(wide);
      return;
    }
    check_avg(tensor, op);
    Timed timed(stats_, 2 * ring(tensor));
    check_mpi(
        MPI_Allreduce(MPI_IN_PLACE, tensor.data_ptr(), mpi_count(tensor.numel(), "all_reduce"),
                      mpi_type(tensor.scalar_type()), mpi_op(op), comm_),
        "MPI_Allreduce");
    if (op == ReduceOp::kAvg) tensor.div_(world_size_);
  }

  void all_gather(const at::Tensor& input, at::Tensor& output) override {
    require_cpu_contiguous(input, "all_gather");
    require_cpu_contiguous(output, "all_gather");
    check_sizes(output.numel() == input.numel() * world_size_ &&
                    output.scalar_type() == input.scalar_type(),
                "all_gather", input, output);
    const int count = mpi_count(input.numel(), "all_gather");
    const MPI_Datatype type = mpi_type(input.scalar_type());
    Timed timed(stats_, ring(output));
    check_mpi(MPI_Allgather(input.data_ptr(), count, type, output.data_ptr(), count, type, comm_),
              "MPI_Allgather");
  }

  void reduce_scatter(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    require_cpu_contiguous(input, "reduce_scatter");
    require_cpu_contiguous(output, "reduce_scatter");
    check_sizes(input.numel() == output.numel() * world_size_ &&
                    output.scalar_type() == input.scalar_type(),
                "reduce_scatter", input, output);
    if (is_half_precision(input)) {
      at::Tensor wide_out = at::empty(output.sizes(), output.options().dtype(at::kFloat));
      reduce_scatter(input.to(at::kFloat), wide_out, op);
      output.copy_(wide_out);
      return;
    }
    check_avg(input, op);
    Timed timed(stats_, ring(input));
    check_mpi(MPI_Reduce_scatter_block(input.data_ptr(), output.data_ptr(),
                                       mpi_count(output.numel(), "reduce_scatter"),
                                       mpi_type(input.scalar_type()), mpi_op(op), comm_),
              "MPI_Reduce_scatter_block");
    if (op == ReduceOp::kAvg) output.div_(world_size_);
  }

  void broadcast(at::Tensor& tensor, int root) override {
    require_cpu_contiguous(tensor, "broadcast");
    Timed timed(stats_, static_cast<double>(tensor.nbytes()));
    check_mpi(MPI_Bcast(tensor.data_ptr(), mpi_count(tensor.numel(), "broadcast"),
                        mpi_type(tensor.scalar_type()), root, comm_),
              "MPI_Bcast");
  }

  CommStats stats() const override { return stats_; }

  void barrier() override { check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }

  std::vector<std::string> all_gather_strings(const std::string& text) override {
    return detail::mpi_all_gather_strings(text, comm_);
  }
  std::string broadcast_string(const std::string& text, int root) override {
    return detail::mpi_broadcast_string(text, root, comm_);
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm part = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split");
    MPI_Comm_set_errhandler(part, MPI_ERRORS_RETURN);
    return std::make_unique<MpiCommunicator>(part, /*owned=*/true);
  }

  std::optional<RankFailure> agree(bool ok, const std::string& message) override {
    const int mine = ok ? world_size_ : rank_;
    int first = world_size_;
    check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
    if (first == world_size_) return std::nullopt;
    long length = rank_ == first ? static_cast<long>(message.size()) : 0;
    check_mpi(MPI_Bcast(&length, 1, MPI_LONG, first, comm_), "MPI_Bcast");
    std::string text = rank_ == first ? message : std::string(static_cast<size_t>(length), '\0');
    check_mpi(MPI_Bcast(text.data(), static_cast<int>(length), MPI_CHAR, first, comm_),
              "MPI_Bcast");
    return RankFailure{first, text};
  }

 private:
  static void check_avg(const at::Tensor& t, ReduceOp op) {
    if (op == ReduceOp::kAvg && !at::isFloatingType(t.scalar_type())) {
      throw DistributedError(fmt::format("ReduceOp::kAvg needs a floating-point tensor, got {}",
                                         c10::toString(t.scalar_type())));
    }
  }
  static void check_sizes(bool ok, const char* what, const at::Tensor& input,
                          const at::Tensor& output) {
    if (!ok) {
      throw DistributedError(
          fmt::format("{}: input of {} {} elements does not match output of "
                      "{} {} elements for this world size",
                      what, input.numel(), c10::toString(input.scalar_type()), output.numel(),
                      c10::toString(output.scalar_type())));
    }
  }

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0;
  int world_size_ = 1;
  CommStats stats_;
};

// The work of a collective that already ran.
class CompletedWork final : public CommWork {
 public:
  void wait() override {}
  bool synchronous() const override { return true; }
};

}  // namespace

std::unique_ptr<CommWork> Communicator::all_gather_async(const at::Tensor& input,
                                                         at::Tensor& output) {
  all_gather(input, output);
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CommWork> Communicator::reduce_scatter_async(const at::Tensor& input,
                                                             at::Tensor& output, ReduceOp op) {
  reduce_scatter(input, output, op);
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<Communicator> make_mpi_communicator(const ProcessGroup& group) {
  (void)group;  // MPI is initialised: the world is MPI_COMM_WORLD
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, /*owned=*/false);
}

std::optional<std::string> run_and_agree(Communicator& comm, const std::string& what,
                                         const std::function<void()>& body) {
  std::string error;
  try {
    body();
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  const std::optional<RankFailure> failure = comm.agree(error.empty(), error);
  if (!failure) return std::nullopt;
  return comm.world_size() > 1
             ? fmt::format("{} failed on rank {}: {}", what, failure->rank, failure->message)
             : fmt::format("{} failed: {}", what, failure->message);
}

}  // namespace strata
