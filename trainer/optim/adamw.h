// AdamW with decoupled weight decay (torch.optim.AdamW's update), a per-parameter decay flag
// (no decay on norms and embeddings), and gradient clipping by the global norm. Device-generic:
// the tensors' device does the arithmetic (fused CPU kernels for fp32 CPU tensors, ATen ops
// elsewhere), and nothing in a step reads a value back to the host.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "trainer/config/config.h"
#include "trainer/model/state_dict.h"

namespace strata {

// Weight decay applies to matmul weights only: not to norms, not to the token embedding.
bool uses_weight_decay(const std::string& fqn, int64_t ndim);

class AdamW {
 public:
  explicit AdamW(const OptimizerConfig& config);

  void add_parameter(const std::string& fqn, const at::Tensor& param, bool decay);
  // A parameter whose weight decay varies per element (e.g. a flat FSDP shard holding norms
  // and matmul weights): `decay_mask` is 1 where decay applies, 0 elsewhere.
  void add_parameter(const std::string& fqn, const at::Tensor& param, const at::Tensor& decay_mask);
  // One update with learning rate `lr` from each parameter's .grad() (skips undefined grads).
  void step(double lr);
  void zero_grad();

  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t steps) { step_ = steps; }  // when resuming (bias correction)
  // exp_avg / exp_avg_sq per parameter, keyed "<fqn>.exp_avg" / "<fqn>.exp_avg_sq". The
  // tensors are the optimizer's own (writing into them restores a saved state).
  StateDict state() const;

 private:
  struct Slot {
    std::string fqn;
    at::Tensor param, exp_avg, exp_avg_sq;
    bool decay;
    at::Tensor decay_mask;  // undefined: `decay` applies to every element
  };
  OptimizerConfig config_;
  std::vector<Slot> slots_;
  int64_t step_ = 0;
};

// Scales the gradients of `params` in place so that their global L2 norm is at most
// `max_norm` (when max_norm > 0): every gradient is multiplied by clamp(max_norm / (norm +
// 1e-6), max = 1). Returns the norm before clipping as a 0-dim tensor on the gradients' device
// (fp64 on the CPU; on CUDA fp32, or fp64 for fp64 gradients), without waiting for it: no
// .item(), no host synchronisation, so a GPU step runs ahead of the host. The squared norm is
// one fused reduction (the fused fp64 sum of squares for fp32 CPU gradients when the fused
// kernels are on, else at::_foreach_norm); with `comm` the parameters are shards, and one
// all_reduce sums the squared norms of all ranks' shards. Parameters without a gradient are
// skipped. Gradients are expected on one device.
at::Tensor clip_grad_norm_(const std::vector<at::Tensor>& params, double max_norm,
                           Communicator* comm = nullptr);

// clip_grad_norm_ with the norm read back to the host (one synchronisation): for tests and
// callers that log the norm at once.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm,
                      Communicator* comm = nullptr);

}  // namespace strata
