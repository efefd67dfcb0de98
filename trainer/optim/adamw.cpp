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

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, Communicator* comm) {
  at::NoGradGuard no_grad;
  at::Tensor total = at::zeros({1}, at::kDouble);
  for (const at::Tensor& p : params) {
    if (!p.grad().defined()) continue;
    if (fused::enabled(p.grad())) {
      total += fused::sum_of_squares(p.grad());
    } else {
      total += p.grad().to(at::kDouble).pow(2).sum();
    }
  }
  if (comm) comm->all_reduce(total, ReduceOp::kSum);
  const double norm = std::sqrt(total.item<double>());
  if (max_norm > 0.0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const at::Tensor& p : params) {
      if (p.grad().defined()) p.grad().mul_(scale);
    }
  }
  return norm;
}

}  // namespace strata
