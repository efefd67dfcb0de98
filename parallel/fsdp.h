// FSDP units: a group of parameters stored flat in fp32, padded to a multiple of the world
// size and sharded by rank (rank r keeps elements [r*S, (r+1)*S)). Running a unit all-gathers
// it, computes, and frees the full copy; backward re-gathers, recomputes the unit (activation
// checkpointing), and reduce-scatters the gradient into the shard's .grad(), so at most one
// unit's full parameters are alive at a time and gradient accumulation happens on the shard.
// Frozen parameters (e.g. the base weights under LoRA) live in a second flat buffer of the
// unit that is gathered for compute but gets no gradient, no reduce-scatter and no optimizer
// state. The unit knows nothing of models: the caller supplies the computation.
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
  bool trainable = true;
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
  int64_t numel() const { return group(true).numel + group(false).numel; }  // real elements

  // The trainable parameters' flat buffer: what the optimizer steps and gradients reach.
  int64_t trainable_numel() const { return group(true).numel; }
  int64_t shard_numel() const { return group(true).shard_numel; }  // S = ceil(P / N)
  int64_t padded_numel() const { return shard_numel() * comm_.world_size(); }
  // This rank's trainable shard: a leaf fp32 tensor that requires grad (maybe 0 elements).
  at::Tensor& shard() { return groups_[0].shard; }
  const at::Tensor& shard() const { return groups_[0].shard; }

  // Where parameter `index` lives: its group (trainable or frozen), its offset in that
  // group's flat layout, and that group's shard on this rank.
  bool trainable(size_t index) const { return params_[index].trainable; }
  int64_t offset(size_t index) const { return offsets_[index]; }
  int64_t numel_of(size_t index) const;
  const at::Tensor& shard_of(size_t index) const { return group(trainable(index)).shard; }
  int64_t shard_numel_of(size_t index) const { return group(trainable(index)).shard_numel; }

  // Copies this rank's slice of parameter `index`'s full value into its shard.
  void load_param(size_t index, const at::Tensor& full);
  // Per-element values over this rank's trainable shard, from a per-parameter value (only
  // trainable parameters' values are used; 0 in padding).
  at::Tensor shard_mask(const std::vector<float>& per_param) const;

  // Every parameter at full size, in spec order (a collective: gathers both buffers).
  std::vector<at::Tensor> gather_views() const;
  // Views of full flat buffers (trainable, frozen) by spec.
  std::vector<at::Tensor> views(const at::Tensor& trainable_full,
                                const at::Tensor& frozen_full = {}) const;
  // The full flat buffer of one group, gathered from all ranks.
  at::Tensor gather(bool trainable) const;

  // Runs `body` on the gathered parameters with autograd through the trainable shard. With
  // `recompute` (activation checkpointing) the full parameters and the unit's activations are
  // freed after forward and rebuilt in backward (the CPU generator's state is restored for the
  // recomputation, so dropout draws the same mask); without it both stay alive until backward,
  // which then only reduce-scatters (faster, more memory). `body` must outlive the backward
  // pass. Every rank must call run in the same order.
  at::Tensor run(const at::Tensor& input, const Body& body, bool recompute = true);

  Communicator& comm() const { return comm_; }

 private:
  struct Group {
    int64_t numel = 0;        // real elements
    int64_t shard_numel = 0;  // ceil(numel / N)
    at::Tensor shard;
  };
  const Group& group(bool trainable) const { return groups_[trainable ? 0 : 1]; }

  std::string name_;
  std::vector<ParamSpec> params_;
  std::vector<int64_t> offsets_;  // within the parameter's group
  Communicator& comm_;
  Group groups_[2];  // trainable, frozen
};

}  // namespace strata
