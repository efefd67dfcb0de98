// FSDP unit: flat sharded storage and the gather / recompute / reduce-scatter autograd node.
#include "parallel/fsdp.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/custom_function.h>

#include <numeric>

namespace strata {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// forward: gather -> body -> free. backward: gather -> recompute body with grad ->
// reduce-scatter (average over ranks) the full gradient into the shard's gradient.
struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& shard,
                               const at::Tensor& input, FsdpUnit* unit,
                               const FsdpUnit::Body* body) {
    ctx->saved_data["unit"] = reinterpret_cast<int64_t>(unit);
    ctx->saved_data["body"] = reinterpret_cast<int64_t>(body);
    ctx->save_for_backward({input});
    at::Tensor full = unit->gather();
    return {(*body)(unit->views(full), input)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* unit = reinterpret_cast<FsdpUnit*>(ctx->saved_data["unit"].toInt());
    const auto* body = reinterpret_cast<const FsdpUnit::Body*>(ctx->saved_data["body"].toInt());
    const at::Tensor input = ctx->get_saved_variables()[0];
    const bool input_grad = at::isFloatingType(input.scalar_type());

    at::Tensor full = unit->gather().requires_grad_(true);
    at::Tensor local_input = input.detach();
    if (input_grad) local_input.requires_grad_(true);
    at::Tensor output;
    {
      at::AutoGradMode enable_grad(true);
      output = (*body)(unit->views(full), local_input);
    }
    std::vector<at::Tensor> wrt = {full};
    if (input_grad) wrt.push_back(local_input);
    variable_list grads = torch::autograd::grad({output}, wrt, {grad_outputs[0]},
                                                /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
    at::Tensor full_grad = grads[0].defined() ? grads[0] : at::zeros_like(full);
    at::Tensor shard_grad = at::empty({unit->shard_numel()}, full_grad.options());
    unit->comm().reduce_scatter(full_grad.contiguous(), shard_grad, ReduceOp::kAvg);
    return {shard_grad, input_grad ? grads[1] : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

FsdpUnit::FsdpUnit(std::string name, std::vector<ParamSpec> params, Communicator& comm)
    : name_(std::move(name)), params_(std::move(params)), comm_(comm) {
  for (const ParamSpec& p : params_) {
    offsets_.push_back(numel_);
    numel_ += std::accumulate(p.shape.begin(), p.shape.end(), int64_t{1}, std::multiplies<>());
  }
  const int64_t world = comm_.world_size();
  shard_numel_ = (numel_ + world - 1) / world;
  shard_ = at::zeros({shard_numel_}, at::kFloat).requires_grad_(true);
}

void FsdpUnit::load_param(size_t index, const at::Tensor& full) {
  const int64_t begin = offsets_[index], end = begin + full.numel();
  const int64_t shard_begin = comm_.rank() * shard_numel_, shard_end = shard_begin + shard_numel_;
  const int64_t lo = std::max(begin, shard_begin), hi = std::min(end, shard_end);
  if (lo >= hi) return;
  at::NoGradGuard no_grad;
  shard_.narrow(0, lo - shard_begin, hi - lo)
      .copy_(full.reshape({-1}).narrow(0, lo - begin, hi - lo));
}

at::Tensor FsdpUnit::shard_mask(const std::vector<float>& per_param) const {
  at::Tensor full = at::zeros({padded_numel()}, at::kFloat);
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t n = (i + 1 < offsets_.size() ? offsets_[i + 1] : numel_) - offsets_[i];
    full.narrow(0, offsets_[i], n).fill_(per_param[i]);
  }
  return full.narrow(0, comm_.rank() * shard_numel_, shard_numel_).clone();
}

at::Tensor FsdpUnit::gather() const {
  at::Tensor full = at::empty({padded_numel()}, shard_.options().requires_grad(false));
  comm_.all_gather(shard_.detach(), full);
  return full;
}

std::vector<at::Tensor> FsdpUnit::views(const at::Tensor& full) const {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t n = (i + 1 < offsets_.size() ? offsets_[i + 1] : numel_) - offsets_[i];
    out.push_back(full.narrow(0, offsets_[i], n).view(params_[i].shape));
  }
  return out;
}

at::Tensor FsdpUnit::run(const at::Tensor& input, const Body& body, bool recompute) {
  if (recompute || !at::GradMode::is_enabled()) {
    return UnitFunction::apply(shard_, input, this, &body)[0];
  }
  // Keep the graph: the gathered parameters are a leaf whose gradient, once complete, is
  // reduce-scattered and accumulated into the shard's gradient.
  at::Tensor full = gather().requires_grad_(true);
  full.register_hook([this](const at::Tensor& grad) {
    at::Tensor shard_grad = at::empty({shard_numel_}, grad.options());
    comm_.reduce_scatter(grad.contiguous(), shard_grad, ReduceOp::kAvg);
    at::Tensor& accumulated = shard_.mutable_grad();
    accumulated = accumulated.defined() ? accumulated.add_(shard_grad) : shard_grad;
    return at::Tensor();  // leave the full gradient to be freed with the graph
  });
  return body(views(full), input);
}

}  // namespace strata
