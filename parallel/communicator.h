// Collectives on at::Tensor behind one backend-neutral interface (c10d-style). The MPI
// backend serves CPU tensors; the NCCL backend (parallel/nccl_communicator.h) CUDA tensors.
// Every rank of the group must call the same collectives in the same order.
#pragma once

#include <ATen/Tensor.h>

#include <memory>
#include <optional>
#include <functional>
#include <string>
#include <vector>

#include "parallel/process_group.h"

#include "parallel/errors.h"

namespace strata {

enum class ReduceOp { kSum, kAvg, kMax, kMin };

// One rank's failure, as every rank learns it from Communicator::agree.
struct RankFailure {
  int rank = 0;
  std::string message;
};

// Cumulative cost of the collectives so far: wall time inside them, and the bytes each rank
// moves on a ring algorithm ((N-1)/N of the full tensor for all_gather and reduce_scatter,
// twice that for all_reduce). `exposed_seconds`: the part of it that computation waited for
// (not overlapped). MPI runs every collective inside the call: all of its time is exposed.
// NCCL measures, with CUDA events, how long the compute stream stalls at each wait; `seconds`
// stays 0 there (the host only enqueues).
struct CommStats {
  double seconds = 0.0;
  double bytes = 0.0;
  int64_t calls = 0;
  double exposed_seconds = 0.0;
};

// A collective started by one of Communicator's *_async calls. Its tensors must stay alive
// until wait() returns (the NCCL backend also tells CUDA's caching allocator that its stream
// uses them). wait() orders the caller's later work after the collective: on NCCL the current
// CUDA stream waits for it, without a host synchronisation; on a synchronous backend (MPI) the
// collective already ran inside the call and wait() does nothing. A work dropped without wait()
// leaves its output unordered with later work (fine for a result that is thrown away). A work
// must not outlive its communicator.
class CommWork {
 public:
  virtual ~CommWork() = default;
  virtual void wait() = 0;
  // Whether the collective completed inside the call that started it: its output may be read
  // at once.
  virtual bool synchronous() const { return false; }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // In place on `tensor` (contiguous).
  virtual void all_reduce(at::Tensor& tensor, ReduceOp op) = 0;
  // `output` (contiguous, world_size x input.numel() elements) receives every rank's input in
  // rank order.
  virtual void all_gather(const at::Tensor& input, at::Tensor& output) = 0;
  // `input` holds world_size equal chunks; rank r receives the reduction of chunk r.
  virtual void reduce_scatter(const at::Tensor& input, at::Tensor& output, ReduceOp op) = 0;
  // The same collectives started without waiting for them (see CommWork). By default they run
  // synchronously inside the call and return completed work (the MPI backend).
  virtual std::unique_ptr<CommWork> all_gather_async(const at::Tensor& input, at::Tensor& output);
  virtual std::unique_ptr<CommWork> reduce_scatter_async(const at::Tensor& input,
                                                         at::Tensor& output, ReduceOp op);
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
  virtual void barrier() = 0;

  // Every rank says whether its part succeeded; all ranks return the failure of the lowest
  // failing rank (with its message), or nothing when all succeeded. One collective round.
  virtual std::optional<RankFailure> agree(bool ok, const std::string& message) = 0;

  // Control plane, over MPI whatever backend moves the tensors: every rank's `text` in rank
  // order on every rank, and `text` of rank `root`. For small messages (plans, checkpoint
  // reports, errors).
  virtual std::vector<std::string> all_gather_strings(const std::string& text) = 0;
  virtual std::string broadcast_string(const std::string& text, int root) = 0;

  // A communicator over the ranks of this one that pass the same `color`, ranked by `key`
  // (then by rank here), as MPI_Comm_split: the shard and replica groups of hybrid sharding.
  // A collective over this communicator; the result has its own stats.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  virtual CommStats stats() const = 0;
};

inline CommStats& operator+=(CommStats& a, const CommStats& b) {
  a.seconds += b.seconds;
  a.bytes += b.bytes;
  a.calls += b.calls;
  a.exposed_seconds += b.exposed_seconds;
  return a;
}

// Runs `body` on every rank and agrees on the outcome: the message of the lowest failing rank
// ("<what> failed on rank r: <cause>"; "<what> failed: <cause>" on one rank), or nullopt when
// every rank succeeded. run_on_all_ranks throws it as `Error` on every rank.
std::optional<std::string> run_and_agree(Communicator& comm, const std::string& what,
                                         const std::function<void()>& body);
template <class Error = DistributedError>
void run_on_all_ranks(Communicator& comm, const std::string& what,
                      const std::function<void()>& body) {
  if (std::optional<std::string> failure = run_and_agree(comm, what, body)) throw Error(*failure);
}

// Collectives over MPI_COMM_WORLD for CPU tensors of dtype float32, float64, int32, int64,
// uint8, bfloat16 and float16 (the last two moved as 16-bit words and reduced in fp32).
std::unique_ptr<Communicator> make_mpi_communicator(const ProcessGroup& group);

}  // namespace strata
