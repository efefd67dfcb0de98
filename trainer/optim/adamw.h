// AdamW with decoupled weight decay (torch.optim.AdamW's update), a per-parameter decay flag
// (no decay on norms and embeddings), and gradient clipping by the global norm.
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
// `max_norm` (when max_norm > 0). Returns the norm before clipping. With `comm`, the
// parameters are shards: the squared norms of all ranks' shards are summed first.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm,
                      Communicator* comm = nullptr);

}  // namespace strata
