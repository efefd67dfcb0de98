// AdamW and global-norm gradient clipping.
#include "trainer/optim/adamw.h"

#include <cmath>

#include "trainer/kernels/fused_ops.h"

namespace strata {

bool uses_weight_decay(const std::string& fqn, int64_t ndim) {
  return ndim >= 2 && fqn != "tok_embeddings.weight";
}

AdamW::AdamW(const OptimizerConfig& config) : config_(config) {}

void AdamW::add_parameter(const std::string& fqn, const at::Tensor& param, bool decay) {
  slots_.push_back({fqn, param, at::zeros_like(param), at::zeros_like(param), decay, {}});
}

void AdamW::add_parameter(const std::string& fqn, const at::Tensor& param,
                          const at::Tensor& decay_mask) {
  slots_.push_back({fqn, param, at::zeros_like(param), at::zeros_like(param), true, decay_mask});
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const double beta1 = config_.betas[0], beta2 = config_.betas[1];
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step_));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step_));
  const double step_size = lr / bias1;
  const double bias2_sqrt = std::sqrt(bias2);
  for (Slot& s : slots_) {
    const at::Tensor& grad = s.param.grad();
    if (!grad.defined()) continue;
    if (fused::enabled(s.param) && s.param.is_contiguous() && grad.is_contiguous()) {
      const double decay = s.decay ? lr * config_.weight_decay : 0.0;
      at::Tensor param = s.param.detach();
      fused::adamw_update(param, grad, s.exp_avg, s.exp_avg_sq,
                          s.decay ? s.decay_mask : at::Tensor(),
                          {static_cast<float>(decay), static_cast<float>(beta1),
                           static_cast<float>(beta2), static_cast<float>(step_size),
                           static_cast<float>(bias2_sqrt), static_cast<float>(config_.eps)});
      continue;
    }
    if (s.decay && config_.weight_decay != 0.0) {
      if (s.decay_mask.defined()) {
        s.param.addcmul_(s.param, s.decay_mask, -lr * config_.weight_decay);
      } else {
        s.param.mul_(1.0 - lr * config_.weight_decay);
      }
    }
    s.exp_avg.lerp_(grad, 1.0 - beta1);
    s.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
    at::Tensor denom = s.exp_avg_sq.sqrt().div_(bias2_sqrt).add_(config_.eps);
    s.param.addcdiv_(s.exp_avg, denom, -step_size);
  }
}

// Gradients are dropped, not zeroed: the next backward's first gradient becomes .grad without
// a copy or an addition (torch's zero_grad(set_to_none=True)).
void AdamW::zero_grad() {
  for (Slot& s : slots_) s.param.mutable_grad().reset();
}

StateDict AdamW::state() const {
  StateDict sd;
  for (const Slot& s : slots_) {
    sd.insert(s.fqn + ".exp_avg", s.exp_avg);
    sd.insert(s.fqn + ".exp_avg_sq", s.exp_avg_sq);
  }
  return sd;
}

at::Tensor clip_grad_norm_(const std::vector<at::Tensor>& params, double max_norm,
                           Communicator* comm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;  // every gradient, to scale
  std::vector<at::Tensor> aten;   // those the fused kernels do not serve
  double fused_sum = 0.0;         // fp32 CPU gradients: summed in fp64 by the fused kernel
  bool any_double = false;
  for (const at::Tensor& p : params) {
    const at::Tensor& grad = p.grad();
    if (!grad.defined()) continue;
    grads.push_back(grad);
    any_double = any_double || grad.scalar_type() == at::kDouble;
    if (fused::enabled(grad)) {
      fused_sum += fused::sum_of_squares(grad);
    } else {
      aten.push_back(grad);
    }
  }
  const at::Device device = grads.empty()
                                ? (params.empty() ? at::Device(at::kCPU) : params.front().device())
                                : grads.front().device();
  // The CPU accumulates in fp64 as the fused kernel does; a GPU in fp32 (as torch's
  // clip_grad_norm_), which _foreach_norm computes in one launch for every gradient.
  const at::ScalarType acc = device.is_cpu() || any_double ? at::kDouble : at::kFloat;
  at::Tensor total = at::full({1}, fused_sum, at::TensorOptions().dtype(acc).device(device));
  if (!aten.empty()) {
    const std::vector<at::Tensor> norms = at::_foreach_norm(aten, 2, acc);
    total.add_(at::stack(norms).square().sum());
  }
  if (comm) comm->all_reduce(total, ReduceOp::kSum);
  at::Tensor norm = total.sqrt().squeeze(0);
  if (max_norm > 0.0 && !grads.empty()) {
    // 1 (an exact no-op) when the norm is within the limit.
    const at::Tensor scale = (max_norm / (norm + 1e-6)).clamp_max(1.0);
    at::_foreach_mul_(grads, scale);
  }
  return norm;
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, Communicator* comm) {
  return clip_grad_norm_(params, max_norm, comm).item<double>();
}

}  // namespace strata
