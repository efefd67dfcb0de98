// The Llama with FSDP-sharded parameters: one FsdpUnit for the embedding, one per
// transformer block, one for the final norm + output projection (with tied embeddings the
// final norm joins the embedding unit, whose gathered weight then also serves the output).
// Construction allocates the shards (zero); a checkpoint may then fill them piece by piece, and
// `initialize` draws the parameters not loaded, one full parameter at a time, so no rank ever
// holds more than one full parameter, and the values equal the unsharded model's
// (per-(seed, fqn) generators).
#pragma once

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "parallel/fsdp.h"
#include "trainer/model/llama.h"
#include "trainer/optim/adamw.h"

namespace strata {

class ShardedLlama : public LanguageModel {
 public:
  // `recompute`: activation checkpointing per unit (see FsdpUnit::run). `converters` (may be
  // null; must outlive the model): parameters they add are sharded like the others, and the
  // parameters they freeze go to each unit's frozen buffer. `options`: the device the shards
  // (fp32) and the computation live on, the mixed-precision dtypes, and prefetch (FsdpOptions).
  ShardedLlama(const ModelConfig& config, Communicator& comm, bool recompute = true,
               const Converters* converters = nullptr, const FsdpOptions& options = {});
  ShardedLlama(const ShardedLlama&) = delete;  // the unit bodies capture `this`
  ShardedLlama& operator=(const ShardedLlama&) = delete;

  const ModelConfig& config() const override { return model_.config(); }
  at::Device device() const override { return options_.device; }
  // The blocks read `documents` from a copy kept until the next forward: recomputation in
  // backward (which runs before the next forward) sees the same documents.
  at::Tensor forward(const at::Tensor& tokens,
                     const DocumentMask* documents = nullptr) const override;

  // Completes the gradients' reduce-scatters still running (an asynchronous backend: NCCL).
  // The trainer calls it after loss.backward() and before reading gradients (clipping, the
  // optimizer, the replica all-reduce). Nothing to do on MPI.
  void finish_gradients();

  // Initialises every parameter whose FQN is not in `loaded`; returns the FQNs it initialised.
  std::vector<std::string> initialize(uint64_t seed, const std::set<std::string>& loaded = {});

  const std::vector<std::unique_ptr<FsdpUnit>>& units() const { return units_; }
  // The model on the meta device: parameter names, shapes and order (no values).
  const Llama& meta_model() const { return model_; }
  // Every parameter at full size in fp32 (the master values, whatever the compute dtype), by
  // FQN (a collective: all ranks must call it).
  StateDict gather_parameters() const;

  // Hands every unit's trainable shard to `optimizer`, with the per-element weight-decay mask
  // of the parameters it holds; returns the shards (what gradient clipping looks at).
  std::vector<at::Tensor> add_to_optimizer(AdamW& optimizer) const;

 private:
  Llama model_;  // parameters stay on the meta device: names, shapes and the unit bodies
  std::vector<std::unique_ptr<FsdpUnit>> units_;
  std::vector<FsdpUnit::Body> block_bodies_;
  FsdpUnit::Body embed_body_, head_body_;
  bool recompute_;
  FsdpOptions options_;
  mutable std::optional<DocumentMask> documents_;  // of the latest forward
};

}  // namespace strata
