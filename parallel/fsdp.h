// FSDP units: a group of parameters stored as one flat fp32 buffer, padded to a multiple of
// the world size and sharded by rank (rank r keeps elements [r*S, (r+1)*S)). Running a unit
// all-gathers it, computes, and frees the full copy; backward re-gathers, recomputes the unit
// (activation checkpointing), and reduce-scatters the gradient into the shard's .grad(), so
// at most one unit's full parameters are alive at a time and gradient accumulation happens
// on the shard. The unit knows nothing of models: the caller supplies the computation.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace strata {

struct ParamSpec {
  std::string fqn;
  std::vector<int64_t> shape;
};

class FsdpUnit {
 public:
  // The computation of a unit: full parameters (views, in spec order) and an input -> output.
  using Body = std::function<at::Tensor(const std::vector<at::Tensor>&, const at::Tensor&)>;

  FsdpUnit(std::string name, std::vector<ParamSpec> params, Communicator& comm);
  FsdpUnit(const FsdpUnit&) = delete;
  FsdpUnit& operator=(const FsdpUnit&) = delete;

  const std::string& name() const { return name_; }
  const std::vector<ParamSpec>& params() const { return params_; }
  int64_t numel() const { return numel_; }              // P: real elements
  int64_t padded_numel() const { return shard_numel_ * comm_.world_size(); }
  int64_t shard_numel() const { return shard_numel_; }  // S = ceil(P / N)
  int64_t offset(size_t index) const { return offsets_[index]; }

  // This rank's shard: a leaf fp32 tensor that requires grad (the optimizer steps it).
  at::Tensor& shard() { return shard_; }
  const at::Tensor& shard() const { return shard_; }

  // Copies this rank's slice of parameter `index`'s full value into the shard.
  void load_param(size_t index, const at::Tensor& full);
  // Per-element values over this rank's shard, from a per-parameter value (0 in padding).
  at::Tensor shard_mask(const std::vector<float>& per_param) const;

  // The full flat parameter (padded), gathered from all ranks; and views of it by spec.
  at::Tensor gather() const;
  std::vector<at::Tensor> views(const at::Tensor& full) const;

  // Runs `body` on the gathered parameters with autograd through the shard. With `recompute`
  // (activation checkpointing) the full parameters and the unit's activations are freed after
  // forward and rebuilt in backward; without it both stay alive until backward, which then
  // only reduce-scatters (faster, more memory). `body` must outlive the backward pass.
  // Every rank must call run in the same order.
  at::Tensor run(const at::Tensor& input, const Body& body, bool recompute = true);

  Communicator& comm() const { return comm_; }

 private:
  std::string name_;
  std::vector<ParamSpec> params_;
  std::vector<int64_t> offsets_;
  int64_t numel_ = 0;
  int64_t shard_numel_ = 0;
  Communicator& comm_;
  at::Tensor shard_;
};

}  // namespace strata
