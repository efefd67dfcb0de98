// FSDP unit: flat sharded storage, mixed-precision gathers with prefetch, and the gather /
// recompute / reduce-scatter autograd node.
#include "parallel/fsdp.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <iterator>
#include <mutex>
#include <numeric>

#include "parallel/cuda_support.h"

namespace strata {

// The reduce-scatters an asynchronous backend is still running, in the order they started
// (every rank completes them in that order). At most a few units' gradients wait here: a new
// reduce-scatter first completes the older ones, whose collectives overlapped the compute in
// between.
struct PendingReduces {
  struct Entry {
    FsdpUnit* unit;
    at::Tensor input, output;  // kept alive until the collective completes
    std::unique_ptr<CommWork> work;
  };

  // Completes the entries of `unit` (every unit's when null).
  void complete(const FsdpUnit* unit) {
    std::vector<Entry> done;
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto split = std::stable_partition(entries.begin(), entries.end(), [&](const Entry& e) {
        return unit != nullptr && e.unit != unit;
      });
      std::move(split, entries.end(), std::back_inserter(done));
      entries.erase(split, entries.end());
    }
    for (Entry& e : done) {
      e.work->wait();
      e.unit->accumulate_gradient(e.output);
    }
  }
  void add(Entry entry) {
    std::lock_guard<std::mutex> lock(mutex);
    entries.push_back(std::move(entry));
  }

  std::mutex mutex;
  std::vector<Entry> entries;
};

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

PendingReduces& pending_reduces() {
  static PendingReduces pending;
  return pending;
}

std::mutex trace_mutex;
std::vector<GatherEvent>* gather_trace = nullptr;

void trace_gather(const std::string& unit, bool prefetch) {
  std::lock_guard<std::mutex> lock(trace_mutex);
  if (gather_trace) gather_trace->push_back({unit, prefetch});
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

// The default generators' states that a recomputation replays: the CPU one, and the unit's
// CUDA device's.
struct RngStates {
  explicit RngStates(const at::Device& device) : device(device) {
    cpu = at::detail::getDefaultCPUGenerator().get_state();
    if (device.is_cuda()) cuda = detail::cuda_rng_state(device);
  }
  void restore() const {
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(cpu);
    if (device.is_cuda()) detail::set_cuda_rng_state(device, cuda);
  }
  at::Device device;
  at::Tensor cpu, cuda;
};

// forward: gather -> body -> free. backward: gather (prefetching the next unit) -> recompute
// body with grad (same generator states as in forward) -> reduce-scatter the trainable
// gradient into the shard's (FsdpUnit::reduce_gradient accumulates it, so autograd gets none
// for the shard).
struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& shard,
                               const at::Tensor& input, FsdpUnit* unit, const FsdpUnit::Body* body,
                               FsdpUnit* forward_next, FsdpUnit* backward_prefetch) {
    ctx->saved_data["unit"] = reinterpret_cast<int64_t>(unit);
    ctx->saved_data["body"] = reinterpret_cast<int64_t>(body);
    ctx->saved_data["next"] = reinterpret_cast<int64_t>(backward_prefetch);
    const RngStates rng(unit->options().device);
    ctx->saved_data["rng"] = rng.cpu;
    if (rng.cuda.defined()) ctx->saved_data["cuda_rng"] = rng.cuda;
    ctx->save_for_backward({input});
    auto [trainable_full, frozen_full] = unit->gather_for_compute();
    if (forward_next) forward_next->prefetch();
    return {(*body)(unit->views(trainable_full, frozen_full), input)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* unit = reinterpret_cast<FsdpUnit*>(ctx->saved_data["unit"].toInt());
    const auto* body = reinterpret_cast<const FsdpUnit::Body*>(ctx->saved_data["body"].toInt());
    auto* next = reinterpret_cast<FsdpUnit*>(ctx->saved_data["next"].toInt());
    const at::Tensor input = ctx->get_saved_variables()[0];
    const bool input_grad = at::isFloatingType(input.scalar_type());
    const bool param_grad = unit->shard_numel() > 0;
    const variable_list none(6);
    if (!input_grad && !param_grad) return none;

    auto [full, frozen_full] = unit->gather_for_compute();
    if (next) next->prefetch();  // overlaps this unit's recomputation
    full.requires_grad_(param_grad);
    at::Tensor local_input = input.detach();
    if (input_grad) local_input.requires_grad_(true);
    at::Tensor output;
    {
      // Replay forward's random draws (dropout), then give the generators back their states.
      const RngStates current(unit->options().device);
      RngStates saved = current;
      saved.cpu = ctx->saved_data["rng"].toTensor();
      if (saved.device.is_cuda()) saved.cuda = ctx->saved_data["cuda_rng"].toTensor();
      saved.restore();
      at::AutoGradMode enable_grad(true);
      output = (*body)(unit->views(full, frozen_full), local_input);
      current.restore();
    }
    std::vector<at::Tensor> wrt;
    if (param_grad) wrt.push_back(full);
    if (input_grad) wrt.push_back(local_input);
    variable_list grads = torch::autograd::grad({output}, wrt, {grad_outputs[0]},
                                                /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
    if (param_grad) unit->reduce_gradient(grads[0].defined() ? grads[0] : at::zeros_like(full));
    variable_list result = none;
    if (input_grad) result[1] = grads.back();
    return result;
  }
};

}  // namespace

void set_gather_trace(std::vector<GatherEvent>* trace) {
  std::lock_guard<std::mutex> lock(trace_mutex);
  gather_trace = trace;
}

// A prefetch under way: per group, the full buffer, the cast shard it gathers from, the
// collective, and the shard's version when it started (a later in-place change makes it stale).
struct FsdpUnit::Prefetched {
  at::Tensor full[2], input[2];
  std::unique_ptr<CommWork> work[2];
  int64_t version[2] = {0, 0};
};

FsdpUnit::FsdpUnit(std::string name, std::vector<ParamSpec> params, Communicator& comm,
                   const FsdpOptions& options)
    : name_(std::move(name)), params_(std::move(params)), comm_(comm), options_(options) {
  for (const ParamSpec& p : params_) {
    Group& g = groups_[p.trainable ? 0 : 1];
    offsets_.push_back(g.numel);
    g.numel += std::accumulate(p.shape.begin(), p.shape.end(), int64_t{1}, std::multiplies<>());
  }
  const int64_t world = comm_.world_size();
  for (Group& g : groups_) g.shard_numel = (g.numel + world - 1) / world;
  const auto fp32 = at::TensorOptions().dtype(at::kFloat).device(options_.device);
  groups_[0].shard = at::zeros({groups_[0].shard_numel}, fp32).requires_grad_(true);
  groups_[1].shard = at::zeros({groups_[1].shard_numel}, fp32);
}

FsdpUnit::~FsdpUnit() {
  try {
    finish_gradients();  // no pending reduce-scatter may outlive its unit
  } catch (...) {        // a failed collective was reported where it failed
  }
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
  return full.narrow(0, comm_.rank() * shard_numel(), shard_numel()).clone().to(options_.device);
}

FsdpUnit::GatherWork FsdpUnit::start_gather(const Group& g, at::ScalarType dtype) const {
  GatherWork w;
  w.full = at::empty({g.shard_numel * comm_.world_size()},
                     g.shard.options().dtype(dtype).requires_grad(false));
  if (g.shard_numel == 0) return w;
  // Cast before the collective: a bf16 gather moves half the bytes of an fp32 one.
  w.input = g.shard.detach().to(dtype).contiguous();
  w.work = comm_.all_gather_async(w.input, w.full);
  return w;
}

at::Tensor FsdpUnit::gather(bool trainable, at::ScalarType dtype) const {
  GatherWork w = start_gather(group(trainable), dtype);
  if (w.work) w.work->wait();
  return w.full;
}

void FsdpUnit::prefetch() {
  if (!prefetched_) start_gathers(/*prefetch=*/true);
}

void FsdpUnit::start_gathers(bool prefetch) {
  trace_gather(name_, prefetch);
  auto p = std::make_unique<Prefetched>();
  for (int k = 0; k < 2; ++k) {
    const Group& g = groups_[k];
    p->version[k] = g.shard._version();
    GatherWork w = start_gather(g, options_.param_dtype);
    p->full[k] = std::move(w.full);
    p->input[k] = std::move(w.input);
    p->work[k] = std::move(w.work);
  }
  prefetched_ = std::move(p);
}

std::pair<at::Tensor, at::Tensor> FsdpUnit::gather_for_compute() {
  if (prefetched_ && (prefetched_->version[0] != groups_[0].shard._version() ||
                      prefetched_->version[1] != groups_[1].shard._version())) {
    prefetched_.reset();  // the shards changed since it started: gather them again
  }
  if (!prefetched_) start_gathers(/*prefetch=*/false);
  std::unique_ptr<Prefetched> p = std::move(prefetched_);
  for (auto& work : p->work) {
    if (work) work->wait();
  }
  return {p->full[0], p->full[1]};
}

void FsdpUnit::reduce_gradient(const at::Tensor& full_grad) {
  if (shard_numel() == 0) return;
  PendingReduces& pending = pending_reduces();
  pending.complete(nullptr);  // the older ones overlapped the compute since they started
  at::Tensor input = full_grad.to(options_.reduce_dtype).contiguous();
  at::Tensor output = at::empty({shard_numel()}, input.options());
  std::unique_ptr<CommWork> work = comm_.reduce_scatter_async(input, output, ReduceOp::kAvg);
  if (work->synchronous()) {
    accumulate_gradient(output);
  } else {
    pending.add({this, std::move(input), std::move(output), std::move(work)});
  }
}

void FsdpUnit::accumulate_gradient(const at::Tensor& shard_grad) {
  at::NoGradGuard no_grad;
  at::Tensor grad = shard_grad.to(at::kFloat);
  at::Tensor& accumulated = groups_[0].shard.mutable_grad();
  accumulated = accumulated.defined() ? accumulated.add_(grad) : grad;
}

void FsdpUnit::finish_gradients() {
  pending_reduces().complete(this);
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

std::vector<at::Tensor> FsdpUnit::gather_views(at::ScalarType dtype) const {
  return views(gather(true, dtype), gather(false, dtype));
}

at::Tensor FsdpUnit::run(const at::Tensor& input, const Body& body, bool recompute,
                         const Links& links) {
  FsdpUnit* forward_next = options_.prefetch ? links.forward_next : nullptr;
  const bool graph = at::GradMode::is_enabled();
  if (recompute || !graph) {
    // The unit whose backward follows this run's, when that backward will gather.
    FsdpUnit* backward_prefetch =
        options_.prefetch && graph && links.backward_next && links.backward_next->backward_gathers_
            ? links.backward_next
            : nullptr;
    backward_gathers_ = graph && (at::isFloatingType(input.scalar_type()) || shard_numel() > 0);
    return UnitFunction::apply(groups_[0].shard, input, this, &body, forward_next,
                               backward_prefetch)[0];
  }
  backward_gathers_ = false;
  // Keep the graph: the gathered trainable parameters are a leaf whose gradient, once
  // complete, is reduce-scattered and accumulated into the shard's gradient.
  auto [full, frozen_full] = gather_for_compute();
  if (forward_next) forward_next->prefetch();
  if (shard_numel() > 0) {
    full.requires_grad_(true);
    full.register_hook([this](const at::Tensor& grad) {
      reduce_gradient(grad);
      return at::Tensor();  // leave the full gradient to be freed with the graph
    });
  }
  return body(views(full, frozen_full), input);
}

}  // namespace strata
