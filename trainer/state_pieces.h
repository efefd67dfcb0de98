// The training state as checkpoint pieces: what this rank holds of every parameter and of
// AdamW's moments, as contiguous flat ranges of the full tensors. The pieces alias the live
// tensors, so saving reads them and loading writes straight into them.
//
// Keys: model parameters by FQN ("layers.0.attention.wq.weight"), AdamW moments as
// "optimizer.<fqn>.exp_avg" / "optimizer.<fqn>.exp_avg_sq".
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "checkpoint/sharded_checkpoint.h"
#include "trainer/model/llama.h"
#include "trainer/optim/adamw.h"
#include "trainer/model/sharded_llama.h"

namespace strata {

// FSDP: each rank's shard of each unit, split by parameter (the padding is not saved). The
// same ranges serve saving and loading. `optimizer` null: parameters only.
std::vector<TensorPiece> state_pieces(const ShardedLlama& model, const AdamW* optimizer);

// A whole model on every rank (one rank, or replicated data parallel). Saving: rank r of
// `world` writes the r-th 1/world slice of every tensor, so all ranks share the writing.
// Loading: every rank fills whole tensors.
enum class PieceUse { kSave, kLoad };

// The parameter a piece key belongs to: the key itself, or <fqn> of "optimizer.<fqn>.exp_avg".
std::string parameter_of(const std::string& key);
// The pieces whose keys `keep` accepts, in order.
std::vector<TensorPiece> keep_if(std::vector<TensorPiece> pieces,
                                 const std::function<bool(const std::string&)>& keep);
std::vector<TensorPiece> state_pieces(const Llama& model, const AdamW* optimizer, int rank,
                                      int world, PieceUse use);

// What one of `count` ranks holding the same pieces writes, so that each element is written
// once: the `index`-th of `count` equal parts of every piece (the last parts may be empty; an
// empty piece is still listed). Replicated data parallel shares whole tensors among the world;
// hybrid sharding shares each shard among its replica group.
std::vector<TensorPiece> share_of_pieces(std::vector<TensorPiece> pieces, int index, int count);

}  // namespace strata
