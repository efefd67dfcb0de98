// Training state <-> checkpoint pieces.
#include "trainer/state_pieces.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace strata {
namespace {

std::string moment_key(const std::string& fqn, const char* moment) {
  return "optimizer." + fqn + "." + moment;
}

}  // namespace

std::string parameter_of(const std::string& key) {
  if (key.rfind("optimizer.", 0) != 0) return key;
  return key.substr(10, key.rfind('.') - 10);
}

std::vector<TensorPiece> keep_if(std::vector<TensorPiece> pieces,
                                 const std::function<bool(const std::string&)>& keep) {
  pieces.erase(std::remove_if(pieces.begin(), pieces.end(),
                              [&](const TensorPiece& p) { return !keep(p.key); }),
               pieces.end());
  return pieces;
}

std::vector<TensorPiece> share_of_pieces(std::vector<TensorPiece> pieces, int index, int count) {
  for (TensorPiece& piece : pieces) {
    const int64_t n = piece.local.numel();
    const int64_t chunk = (n + count - 1) / count;
    const int64_t begin = std::min(n, index * chunk), end = std::min(n, begin + chunk);
    piece.begin += begin;
    piece.local = piece.local.narrow(0, begin, end - begin);
  }
  return pieces;
}

std::vector<TensorPiece> state_pieces(const ShardedLlama& model, const AdamW* optimizer) {
  std::vector<TensorPiece> model_pieces, moment_pieces;
  const StateDict moments = optimizer ? optimizer->state() : StateDict();
  for (const auto& unit : model.units()) {
    for (size_t i = 0; i < unit->params().size(); ++i) {
      // The parameter's range in its group's flat layout, intersected with this rank's shard.
      const ParamSpec& spec = unit->params()[i];
      const int64_t shard_begin = unit->comm().rank() * unit->shard_numel_of(i);
      const int64_t shard_end = shard_begin + unit->shard_numel_of(i);
      const int64_t begin = unit->offset(i), end = begin + unit->numel_of(i);
      const int64_t lo = std::max(begin, shard_begin), hi = std::max(lo, std::min(end, shard_end));
      // An empty intersection still lists the key (every rank names the same tensors).
      const int64_t at = lo < hi ? lo - shard_begin : 0, count = hi - lo;
      model_pieces.push_back({spec.fqn, spec.shape, lo < hi ? lo - begin : 0,
                              unit->shard_of(i).detach().narrow(0, at, count)});
      if (optimizer && unit->trainable(i)) {  // frozen parameters have no optimizer state
        for (const char* moment : {"exp_avg", "exp_avg_sq"}) {
          const at::Tensor& state = moments.at(unit->name() + "." + moment);
          moment_pieces.push_back({moment_key(spec.fqn, moment), spec.shape,
                                   lo < hi ? lo - begin : 0, state.narrow(0, at, count)});
        }
      }
    }
  }
  model_pieces.insert(model_pieces.end(), moment_pieces.begin(), moment_pieces.end());
  return model_pieces;
}

std::vector<TensorPiece> state_pieces(const Llama& model, const AdamW* optimizer, int rank,
                                      int world, PieceUse use) {
  std::vector<TensorPiece> model_pieces, moment_pieces;
  const StateDict moments = optimizer ? optimizer->state() : StateDict();
  auto piece = [&](const std::string& key, const at::Tensor& full) {
    return TensorPiece{key, full.sizes().vec(), 0, full.detach().reshape({-1})};
  };
  for (const auto& [fqn, param] : model.parameters()) {
    model_pieces.push_back(piece(fqn, param));
    if (optimizer && model.trainable(fqn)) {
      for (const char* moment : {"exp_avg", "exp_avg_sq"}) {
        moment_pieces.push_back(
            piece(moment_key(fqn, moment), moments.at(fqn + "." + moment).view(param.sizes())));
      }
    }
  }
  model_pieces.insert(model_pieces.end(), moment_pieces.begin(), moment_pieces.end());
  return use == PieceUse::kSave ? share_of_pieces(std::move(model_pieces), rank, world)
                                : model_pieces;
}

}  // namespace strata
