// FSDP units: a group of parameters stored flat in fp32, padded to a multiple of the world
// size and sharded by rank (rank r keeps elements [r*S, (r+1)*S)). Running a unit all-gathers
// it, computes, and frees the full copy; backward re-gathers, recomputes the unit (activation
// checkpointing), and reduce-scatters the gradient into the shard's .grad(), so at most one
// unit's full parameters are alive at a time and gradient accumulation happens on the shard.
// Frozen parameters (e.g. the base weights under LoRA) live in a second flat buffer of the
// unit that is gathered for compute but gets no gradient, no reduce-scatter and no optimizer
// state. The unit knows nothing of models: the caller supplies the computation.
//
// Mixed precision (FSDP2-style, FsdpOptions): the shards stay fp32 (the master weights the
// optimizer steps); a gather for compute casts the shard to `param_dtype` before the
// all-gather, so the full buffer and the views the body computes with are `param_dtype`. The
// full gradient is cast to `reduce_dtype`, reduce-scattered (averaged) in it, and accumulated
// into the shard's fp32 .grad().
//
// Prefetch: prefetch() starts a unit's all-gathers ahead of use (Communicator::*_async); the
// unit's next gather for compute waits for them and takes the buffers. run() prefetches the
// next unit of forward once its own parameters are there, and with recompute the backward of
// a run prefetches the unit whose backward comes next before recomputing itself.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel/communicator.h"

namespace strata {

struct ParamSpec {
  std::string fqn;
  std::vector<int64_t> shape;
  bool trainable = true;
};

struct FsdpOptions {
  at::Device device = at::kCPU;              // where the shards and the gathered copies live
  at::ScalarType param_dtype = at::kFloat;   // what the bodies compute with (gathered in it)
  at::ScalarType reduce_dtype = at::kFloat;  // what gradients are reduce-scattered in
  bool prefetch = true;                      // overlap the next unit's all-gather (run links)
};

// Test hook: the gathers for compute, in the order they were started. `prefetch`: started
// ahead by prefetch(); otherwise on demand by the unit's own forward or backward.
struct GatherEvent {
  std::string unit;
  bool prefetch = false;
};
// While `trace` is set, every gather for compute appends an event to it; nullptr stops. Only
// for tests (one trace per process; not for concurrent models).
void set_gather_trace(std::vector<GatherEvent>* trace);

class FsdpUnit;

// The neighbours of one run of a unit (see FsdpUnit::run); only used with FsdpOptions::prefetch.
struct FsdpLinks {
  FsdpUnit* forward_next = nullptr;   // the unit that runs next in forward
  FsdpUnit* backward_next = nullptr;  // the unit whose backward runs right after this run's
};

class FsdpUnit {
 public:
  // The computation of a unit: full parameters (views, in spec order) and an input -> output.
  using Body = std::function<at::Tensor(const std::vector<at::Tensor>&, const at::Tensor&)>;

  using Links = FsdpLinks;

  FsdpUnit(std::string name, std::vector<ParamSpec> params, Communicator& comm,
           const FsdpOptions& options = {});
  FsdpUnit(const FsdpUnit&) = delete;
  FsdpUnit& operator=(const FsdpUnit&) = delete;
  ~FsdpUnit();

  const std::string& name() const { return name_; }
  const std::vector<ParamSpec>& params() const { return params_; }
  const FsdpOptions& options() const { return options_; }
  int64_t numel() const { return group(true).numel + group(false).numel; }  // real elements

  // The trainable parameters' flat buffer: what the optimizer steps and gradients reach.
  int64_t trainable_numel() const { return group(true).numel; }
  int64_t shard_numel() const { return group(true).shard_numel; }  // S = ceil(P / N)
  int64_t padded_numel() const { return shard_numel() * comm_.world_size(); }
  // This rank's trainable shard: a leaf fp32 tensor on options().device that requires grad
  // (maybe 0 elements).
  at::Tensor& shard() { return groups_[0].shard; }
  const at::Tensor& shard() const { return groups_[0].shard; }

  // Where parameter `index` lives: its group (trainable or frozen), its offset in that
  // group's flat layout, and that group's shard on this rank.
  bool trainable(size_t index) const { return params_[index].trainable; }
  int64_t offset(size_t index) const { return offsets_[index]; }
  int64_t numel_of(size_t index) const;
  const at::Tensor& shard_of(size_t index) const { return group(trainable(index)).shard; }
  int64_t shard_numel_of(size_t index) const { return group(trainable(index)).shard_numel; }

  // Copies this rank's slice of parameter `index`'s full value (any device) into its shard.
  void load_param(size_t index, const at::Tensor& full);
  // Per-element values over this rank's trainable shard, from a per-parameter value (only
  // trainable parameters' values are used; 0 in padding). On the shard's device.
  at::Tensor shard_mask(const std::vector<float>& per_param) const;

  // Every parameter at full size in `dtype` (fp32 by default: checkpoints, exports and
  // evaluation copies keep the master values), in spec order (a collective: gathers both
  // buffers, synchronously, apart from any prefetch).
  std::vector<at::Tensor> gather_views(at::ScalarType dtype = at::kFloat) const;
  // Views of full flat buffers (trainable, frozen) by spec.
  std::vector<at::Tensor> views(const at::Tensor& trainable_full,
                                const at::Tensor& frozen_full = {}) const;
  // The full flat buffer of one group in `dtype`, gathered from all ranks (synchronous).
  at::Tensor gather(bool trainable, at::ScalarType dtype = at::kFloat) const;

  // Starts the all-gathers of both groups in param_dtype, unless they are already under way.
  // The next gather_for_compute waits for them and takes the buffers; a prefetch that the
  // shards' changes (an optimizer step, load_param) made stale is dropped there. Every rank
  // must prefetch in the same order.
  void prefetch();
  bool prefetch_pending() const { return prefetched_ != nullptr; }
  // Both groups' full buffers (trainable, frozen) in param_dtype, from the pending prefetch or
  // gathered now. Used by run and its backward.
  std::pair<at::Tensor, at::Tensor> gather_for_compute();

  // Reduce-scatters (averages) the full trainable gradient in reduce_dtype and accumulates it
  // into the shard's fp32 .grad(). With an asynchronous backend (NCCL) the collective is left
  // running: the next reduce_gradient of any unit or finish_gradients completes it.
  void reduce_gradient(const at::Tensor& full_grad);
  // Completes this unit's pending reduce-scatters: after it the shard's .grad() is whole. Call
  // after backward, before reading gradients (clipping, the optimizer, replica all-reduce).
  // Nothing to do with a synchronous backend (MPI).
  void finish_gradients();

  // Runs `body` on the gathered parameters with autograd through the trainable shard. With
  // `recompute` (activation checkpointing) the full parameters and the unit's activations are
  // freed after forward and rebuilt in backward (the CPU generator's state, and on CUDA the
  // device's default generator's, are restored for the recomputation, so dropout draws the
  // same mask); without it both stay alive until backward, which then only reduce-scatters
  // (faster, more memory). With options().prefetch, `links.forward_next` is prefetched once
  // this unit's own parameters are gathered, and (recompute) this run's backward prefetches
  // `links.backward_next` before recomputing, when that unit's latest run will gather in its
  // backward. `body` must outlive the backward pass. Every rank must call run in the same
  // order.
  at::Tensor run(const at::Tensor& input, const Body& body, bool recompute = true,
                 const Links& links = {});

  Communicator& comm() const { return comm_; }

 private:
  struct Group {
    int64_t numel = 0;        // real elements
    int64_t shard_numel = 0;  // ceil(numel / N)
    at::Tensor shard;
  };
  struct Prefetched;
  // One group's all-gather in `dtype`, started: the full buffer, the cast shard it reads (alive
  // until the work completes), and the work (null for an empty shard).
  struct GatherWork {
    at::Tensor full, input;
    std::unique_ptr<CommWork> work;
  };
  GatherWork start_gather(const Group& g, at::ScalarType dtype) const;
  const Group& group(bool trainable) const { return groups_[trainable ? 0 : 1]; }
  // Starts both groups' all-gathers in param_dtype into a new prefetched_ (traced).
  void start_gathers(bool prefetch);
  void accumulate_gradient(const at::Tensor& shard_grad);

  std::string name_;
  std::vector<ParamSpec> params_;
  std::vector<int64_t> offsets_;  // within the parameter's group
  Communicator& comm_;
  FsdpOptions options_;
  Group groups_[2];  // trainable, frozen
  std::unique_ptr<Prefetched> prefetched_;
  bool backward_gathers_ = false;  // whether the latest run's backward will gather
  friend struct PendingReduces;
};

}  // namespace strata
