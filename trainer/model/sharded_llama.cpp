// Llama over FSDP units.
#include "trainer/model/sharded_llama.h"

#include <fmt/format.h>

namespace strata {

ShardedLlama::ShardedLlama(const ModelConfig& config, Communicator& comm, bool recompute,
                           const Converters* converters, const FsdpOptions& options)
    : model_(config, converters), recompute_(recompute), options_(options) {
  model_.prepare_buffers(options.device);
  const bool tied = config.tie_embeddings;

  // Group the model's parameters into units by FQN prefix.
  std::vector<ParamSpec> embedding, head;
  std::vector<std::vector<ParamSpec>> blocks(config.n_layers);
  model_.for_each_parameter([&](const std::string& fqn, at::Tensor& meta) {
    ParamSpec spec{fqn, meta.sizes().vec(), model_.trainable(fqn)};
    if (fqn.rfind("layers.", 0) == 0) {
      blocks[std::stoll(fqn.substr(7))].push_back(spec);
    } else if (fqn == "tok_embeddings.weight" || (tied && fqn == "norm.weight")) {
      embedding.push_back(spec);
    } else {
      head.push_back(spec);
    }
  });
  units_.push_back(std::make_unique<FsdpUnit>("tok_embeddings", embedding, comm, options));
  for (int64_t i = 0; i < config.n_layers; ++i) {
    units_.push_back(
        std::make_unique<FsdpUnit>(fmt::format("layers.{}", i), blocks[i], comm, options));
  }
  if (!tied) units_.push_back(std::make_unique<FsdpUnit>("head", head, comm, options));

  embed_body_ = [this](const std::vector<at::Tensor>& p, const at::Tensor& tokens) {
    return model_.embed(p[0], tokens);
  };
  for (int64_t i = 0; i < config.n_layers; ++i) {
    block_bodies_.push_back([this, i](const std::vector<at::Tensor>& p, const at::Tensor& h) {
      return model_.block(model_.layer_from(static_cast<size_t>(i), p), h,
                          documents_ ? &*documents_ : nullptr);
    });
  }
  // Untied: the head unit holds [norm, output]. Tied: the embedding unit holds
  // [tok_embeddings, norm] and the embedding matrix is the output projection.
  head_body_ = tied ? FsdpUnit::Body([this](const std::vector<at::Tensor>& p, const at::Tensor& h) {
    return model_.head(p[1], p[0], h);
  })
                    : FsdpUnit::Body([this](const std::vector<at::Tensor>& p, const at::Tensor& h) {
                        return model_.head(p[0], p[1], h);
                      });
}

at::Tensor ShardedLlama::forward(const at::Tensor& tokens, const DocumentMask* documents) const {
  documents_.reset();
  if (documents) documents_ = *documents;
  // The runs in forward order: embedding, blocks, head (with tied embeddings the embedding
  // unit again). Each prefetches the next; backward runs them in reverse, so with recompute
  // each run's backward prefetches the run before it.
  std::vector<std::pair<FsdpUnit*, const FsdpUnit::Body*>> runs;
  runs.emplace_back(units_.front().get(), &embed_body_);
  for (size_t i = 0; i < block_bodies_.size(); ++i)
    runs.emplace_back(units_[1 + i].get(), &block_bodies_[i]);
  runs.emplace_back(config().tie_embeddings ? units_.front().get() : units_.back().get(),
                    &head_body_);
  at::Tensor h = tokens;
  for (size_t k = 0; k < runs.size(); ++k) {
    FsdpUnit::Links links;
    if (k + 1 < runs.size()) links.forward_next = runs[k + 1].first;
    if (k > 0) links.backward_next = runs[k - 1].first;
    h = runs[k].first->run(h, *runs[k].second, recompute_, links);
  }
  return h;
}

void ShardedLlama::finish_gradients() {
  for (auto& unit : units_) unit->finish_gradients();
}

std::vector<std::string> ShardedLlama::initialize(uint64_t seed,
                                                  const std::set<std::string>& loaded) {
  std::vector<std::string> initialised;
  for (auto& unit : units_) {
    for (size_t i = 0; i < unit->params().size(); ++i) {
      const ParamSpec& spec = unit->params()[i];
      if (loaded.count(spec.fqn)) continue;
      // One full parameter at a time: every rank draws it (the generator is per (seed, fqn))
      // and keeps its slice.
      at::Tensor full =
          at::empty(spec.shape, at::TensorOptions().dtype(at::kFloat).device(options_.device));
      initialize_parameter(config(), spec.fqn, full, seed, model_.converters());
      unit->load_param(i, full);
      initialised.push_back(spec.fqn);
    }
  }
  return initialised;
}

StateDict ShardedLlama::gather_parameters() const {
  StateDict sd;
  for (const auto& unit : units_) {
    const std::vector<at::Tensor> views = unit->gather_views();
    for (size_t i = 0; i < views.size(); ++i) sd.insert(unit->params()[i].fqn, views[i]);
  }
  // Keep the model's FQN order.
  StateDict ordered;
  for (const std::string& fqn : model_.parameters().keys()) ordered.insert(fqn, sd.at(fqn));
  return ordered;
}

}  // namespace strata

namespace strata {

std::vector<at::Tensor> ShardedLlama::add_to_optimizer(AdamW& optimizer) const {
  std::vector<at::Tensor> shards;
  for (const auto& unit : units_) {
    if (unit->shard_numel() == 0) continue;  // frozen throughout: no optimizer state
    std::vector<float> decay;
    for (const ParamSpec& p : unit->params()) {
      decay.push_back(uses_weight_decay(p.fqn, static_cast<int64_t>(p.shape.size())) ? 1.f : 0.f);
    }
    optimizer.add_parameter(unit->name(), unit->shard(), unit->shard_mask(decay));
    shards.push_back(unit->shard());
  }
  return shards;
}

}  // namespace strata
