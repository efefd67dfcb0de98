// FSDP unit: flat sharded storage and the gather / recompute / reduce-scatter autograd node.
#include "parallel/fsdp.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/custom_function.h>

#include <numeric>

namespace strata {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient of the full trainable buffer, reduce-scattered (averaged over ranks) to this
// rank's shard.
at::Tensor scatter_gradient(const FsdpUnit& unit, const at::Tensor& full_grad) {
  at::Tensor shard_grad = at::empty({unit.shard_numel()}, full_grad.options());
  if (unit.shard_numel() > 0)
    unit.comm().reduce_scatter(full_grad.contiguous(), shard_grad, ReduceOp::kAvg);
  return shard_grad;
}

// The trainable parameters as views of a gathered flat buffer that requires grad, with one
// backward that writes each view's gradient into its range of one flat gradient (narrow's own
// backward would build a zero-filled buffer of the whole unit per parameter and add them up).
struct SplitFunction : public torch::autograd::Function<SplitFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& flat, const FsdpUnit* unit) {
    ctx->saved_data["unit"] = reinterpret_cast<int64_t>(unit);
    ctx->saved_data["like"] = flat.new_empty({0});
    ctx->set_materialize_grads(false);  // an unused parameter's gradient: its range stays zero
    variable_list out;
    for (size_t i = 0; i < unit->params().size(); ++i) {
      if (!unit->trainable(i)) continue;
      out.push_back(
          flat.narrow(0, unit->offset(i), unit->numel_of(i)).view(unit->params()[i].shape));
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto* unit = reinterpret_cast<const FsdpUnit*>(ctx->saved_data["unit"].toInt());
    at::Tensor flat =
        at::empty({unit->padded_numel()}, ctx->saved_data["like"].toTensor().options());
    size_t k = 0;
    for (size_t i = 0; i < unit->params().size(); ++i) {
      if (!unit->trainable(i)) continue;
      at::Tensor range = flat.narrow(0, unit->offset(i), unit->numel_of(i));
      if (grads[k].defined()) {
        range.copy_(grads[k].reshape({-1}));
      } else {
        range.zero_();
      }
      ++k;
    }
    flat.narrow(0, unit->trainable_numel(), unit->padded_numel() - unit->trainable_numel()).zero_();
    return {flat, at::Tensor()};
  }
};

// forward: gather -> body -> free. backward: gather -> recompute body with grad (same CPU
// generator state as in forward) -> reduce-scatter the trainable gradient into the shard's.
struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& shard,
                               const at::Tensor& input, FsdpUnit* unit,
                               const FsdpUnit::Body* body) {
    ctx->saved_data["unit"] = reinterpret_cast<int64_t>(unit);
    ctx->saved_data["body"] = reinterpret_cast<int64_t>(body);
    ctx->saved_data["rng"] = at::detail::getDefaultCPUGenerator().get_state();
    ctx->save_for_backward({input});
    return {(*body)(unit->views(unit->gather(true), unit->gather(false)), input)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* unit = reinterpret_cast<FsdpUnit*>(ctx->saved_data["unit"].toInt());
    const auto* body = reinterpret_cast<const FsdpUnit::Body*>(ctx->saved_data["body"].toInt());
    const at::Tensor input = ctx->get_saved_variables()[0];
    const bool input_grad = at::isFloatingType(input.scalar_type());
    const bool param_grad = unit->shard_numel() > 0;
    if (!input_grad && !param_grad) {
      return {at::zeros({0}, grad_outputs[0].options()), at::Tensor(), at::Tensor(), at::Tensor()};
    }

    at::Tensor full = unit->gather(true).requires_grad_(param_grad);
    at::Tensor local_input = input.detach();
    if (input_grad) local_input.requires_grad_(true);
    at::Tensor output;
    {
      // Replay forward's random draws (dropout), then give the generator back its state.
      at::Generator generator = at::detail::getDefaultCPUGenerator();
      const at::Tensor current = generator.get_state();
      generator.set_state(ctx->saved_data["rng"].toTensor());
      at::AutoGradMode enable_grad(true);
      output = (*body)(unit->views(full, unit->gather(false)), local_input);
      generator.set_state(current);
    }
    std::vector<at::Tensor> wrt;
    if (param_grad) wrt.push_back(full);
    if (input_grad) wrt.push_back(local_input);
    variable_list grads = torch::autograd::grad({output}, wrt, {grad_outputs[0]},
                                                /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
    at::Tensor shard_grad = at::zeros({0}, grad_outputs[0].options());
    if (param_grad)
      shard_grad = scatter_gradient(*unit, grads[0].defined() ? grads[0] : at::zeros_like(full));
    return {shard_grad, input_grad ? grads.back() : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

FsdpUnit::FsdpUnit(std::string name, std::vector<ParamSpec> params, Communicator& comm)
    : name_(std::move(name)), params_(std::move(params)), comm_(comm) {
  for (const ParamSpec& p : params_) {
    Group& g = groups_[p.trainable ? 0 : 1];
    offsets_.push_back(g.numel);
    g.numel += std::accumulate(p.shape.begin(), p.shape.end(), int64_t{1}, std::multiplies<>());
  }
  const int64_t world = comm_.world_size();
  for (Group& g : groups_) g.shard_numel = (g.numel + world - 1) / world;
  groups_[0].shard = at::zeros({groups_[0].shard_numel}, at::kFloat).requires_grad_(true);
  groups_[1].shard = at::zeros({groups_[1].shard_numel}, at::kFloat);
}

int64_t FsdpUnit::numel_of(size_t index) const {
  const std::vector<int64_t>& shape = params_[index].shape;
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
}

void FsdpUnit::load_param(size_t index, const at::Tensor& full) {
  const Group& g = group(trainable(index));
  const int64_t begin = offsets_[index], end = begin + full.numel();
  const int64_t shard_begin = comm_.rank() * g.shard_numel, shard_end = shard_begin + g.shard_numel;
  const int64_t lo = std::max(begin, shard_begin), hi = std::min(end, shard_end);
  if (lo >= hi) return;
  at::NoGradGuard no_grad;
  g.shard.narrow(0, lo - shard_begin, hi - lo)
      .copy_(full.reshape({-1}).narrow(0, lo - begin, hi - lo));
}

at::Tensor FsdpUnit::shard_mask(const std::vector<float>& per_param) const {
  at::Tensor full = at::zeros({padded_numel()}, at::kFloat);
  for (size_t i = 0; i < params_.size(); ++i) {
    if (trainable(i)) full.narrow(0, offsets_[i], numel_of(i)).fill_(per_param[i]);
  }
  return full.narrow(0, comm_.rank() * shard_numel(), shard_numel()).clone();
}

at::Tensor FsdpUnit::gather(bool trainable) const {
  const Group& g = group(trainable);
  at::Tensor full =
      at::empty({g.shard_numel * comm_.world_size()}, g.shard.options().requires_grad(false));
  if (g.shard_numel > 0) comm_.all_gather(g.shard.detach(), full);
  return full;
}

std::vector<at::Tensor> FsdpUnit::views(const at::Tensor& trainable_full,
                                        const at::Tensor& frozen_full) const {
  const bool split = trainable_full.defined() && trainable_full.requires_grad();
  const variable_list split_views =
      split ? SplitFunction::apply(trainable_full, this) : variable_list();
  std::vector<at::Tensor> out;
  size_t k = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (split && trainable(i)) {
      out.push_back(split_views[k++]);
      continue;
    }
    const at::Tensor& full = trainable(i) ? trainable_full : frozen_full;
    out.push_back(full.narrow(0, offsets_[i], numel_of(i)).view(params_[i].shape));
  }
  return out;
}

std::vector<at::Tensor> FsdpUnit::gather_views() const {
  return views(gather(true), gather(false));
}

at::Tensor FsdpUnit::run(const at::Tensor& input, const Body& body, bool recompute) {
  if (recompute || !at::GradMode::is_enabled()) {
    return UnitFunction::apply(groups_[0].shard, input, this, &body)[0];
  }
  // Keep the graph: the gathered trainable parameters are a leaf whose gradient, once
  // complete, is reduce-scattered and accumulated into the shard's gradient.
  at::Tensor full = gather(true);
  if (shard_numel() > 0) {
    full.requires_grad_(true);
    full.register_hook([this](const at::Tensor& grad) {
      at::Tensor shard_grad = scatter_gradient(*this, grad);
      at::Tensor& accumulated = groups_[0].shard.mutable_grad();
      accumulated = accumulated.defined() ? accumulated.add_(shard_grad) : shard_grad;
      return at::Tensor();  // leave the full gradient to be freed with the graph
    });
  }
  return body(views(full, gather(false)), input);
}

}  // namespace strata
