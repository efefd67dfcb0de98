// Weighted mixtures of training datasets: the source draw, batches assembled row by row.
#include "trainer/data/mixture.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>

#include "trainer/seed.h"

namespace strata {
namespace {

// Copies the one row of `from` into row `row` of `to`, every per-token field ((B, T), or
// empty for "not present"). A field that `to` has and `from` lacks takes what its absence means:
// a loss mask all ones (every target counts), document starts one document (the whole row).
void copy_row(const TokenBatch& from, TokenBatch& to, int64_t row) {
  const int64_t t = to.seq_len;
  const auto copy = [&](const auto& src, auto& dst) {
    std::copy_n(src.begin(), t, dst.begin() + row * t);
  };
  copy(from.inputs, to.inputs);
  copy(from.targets, to.targets);
  if (!to.loss_mask.empty()) {
    if (from.loss_mask.empty()) {
      std::fill_n(to.loss_mask.begin() + row * t, t, uint8_t{1});
    } else {
      copy(from.loss_mask, to.loss_mask);
    }
  }
  if (!to.doc_start.empty()) {
    if (from.doc_start.empty()) {
      std::fill_n(to.doc_start.begin() + row * t, t, uint8_t{0});
      to.doc_start[row * t] = 1;
    } else {
      copy(from.doc_start, to.doc_start);
    }
  }
}

}  // namespace

DataMixture::DataMixture(std::vector<MixtureSource> sources) : sources_(std::move(sources)) {
  if (sources_.empty()) throw DataError("a data mixture needs at least one source");
  double total = 0.0;
  for (const MixtureSource& s : sources_) {
    if (!(s.weight > 0.0) || !std::isfinite(s.weight)) {
      throw DataError(fmt::format(
          "data source '{}' has weight {}: weights must be positive numbers\nHINT: give every "
          "entry of data.sources a weight > 0 (weights are relative: 5, 3 and 2 give 50%, 30% "
          "and 20%)",
          s.name, s.weight));
    }
    if (s.data.seq_len() != sources_.front().data.seq_len()) {
      throw DataError(fmt::format(
          "data source '{}' has seq_len {}, but source '{}' has seq_len {}: the sources of a "
          "mixture must share one seq_len\nHINT: prepare packed sources with the run's "
          "data.seq_len",
          s.name, s.data.seq_len(), sources_.front().name, sources_.front().data.seq_len()));
    }
    total += s.weight;
    masked_ = masked_ || s.data.has_loss_mask();
    documents_ = documents_ || s.data.has_documents();
  }
  double running = 0.0;
  for (const MixtureSource& s : sources_) {
    running += s.weight;
    cumulative_.push_back(running / total);
  }
  cumulative_.back() = 1.0;
}

double DataMixture::probability(size_t k) const {
  return cumulative_[k] - (k == 0 ? 0.0 : cumulative_[k - 1]);
}

size_t DataMixture::source_of(uint64_t seed, int64_t step, int64_t global_index) const {
  if (sources_.size() == 1) return 0;
  // Its own chain: derive_seed separates it from sample_start's splitmix64(seed) chain.
  uint64_t h = derive_seed(seed, "data/mixture");
  h = splitmix64(h ^ static_cast<uint64_t>(step));
  h = splitmix64(h ^ static_cast<uint64_t>(global_index));
  const double u = static_cast<double>(h >> 11) * 0x1.0p-53;  // [0, 1), 53 bits
  const auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), u);
  return std::min<size_t>(static_cast<size_t>(std::distance(cumulative_.begin(), it)),
                          sources_.size() - 1);
}

std::vector<int64_t> DataMixture::source_counts(uint64_t seed, int64_t step, int64_t first_index,
                                                int64_t count) const {
  std::vector<int64_t> counts(sources_.size(), 0);
  for (int64_t i = 0; i < count; ++i) ++counts[source_of(seed, step, first_index + i)];
  return counts;
}

TokenBatch DataMixture::sample_batch(uint64_t seed, int64_t step, int64_t first_index,
                                     int64_t count) const {
  if (sources_.size() == 1)
    return sources_.front().data.sample_batch(seed, step, first_index, count);
  const int64_t t = seq_len();
  TokenBatch batch;
  batch.batch = count;
  batch.seq_len = t;
  batch.inputs.resize(count * t);
  batch.targets.resize(count * t);
  if (masked_) batch.loss_mask.resize(count * t);
  if (documents_) batch.doc_start.resize(count * t);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t index = first_index + i;
    const TokenDataset& data = sources_[source_of(seed, step, index)].data;
    copy_row(data.sample_batch(seed, step, index, 1), batch, i);
  }
  return batch;
}

int64_t DataMixture::sample_target_count(uint64_t seed, int64_t step, int64_t first_index,
                                         int64_t count) const {
  if (sources_.size() == 1) {
    return sources_.front().data.sample_target_count(seed, step, first_index, count);
  }
  int64_t targets = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t index = first_index + i;
    targets +=
        sources_[source_of(seed, step, index)].data.sample_target_count(seed, step, index, 1);
  }
  return targets;
}

OpenedSources open_data_sources(const DataConfig& data, int64_t vocab_size, bool with_val) {
  const auto open = [&](size_t i, const std::string& pattern) {
    try {
      return TokenDataset(pattern, data.seq_len, vocab_size);
    } catch (const DataError& e) {
      throw DataError(
          fmt::format("data source '{}' (data.sources.{}): {}", data.sources[i].name, i, e.what()));
    }
  };
  std::vector<MixtureSource> train;
  for (size_t i = 0; i < data.sources.size(); ++i) {
    const DataSourceConfig& s = data.sources[i];
    train.push_back({s.name, s.weight, open(i, s.path)});
  }
  OpenedSources opened{DataMixture(std::move(train)), {}, ""};
  opened.description = fmt::format("data: a mixture of {} sources", data.sources.size());
  for (size_t i = 0; i < data.sources.size(); ++i) {
    const DataSourceConfig& s = data.sources[i];
    const TokenDataset& d = opened.train.source(i).data;
    opened.description +=
        fmt::format("\n  {} ({:.1f}%): train {} tokens in {} shard(s) ({})", s.name,
                    100.0 * opened.train.probability(i), d.num_tokens(), d.shards().size(), s.path);
    if (s.val && with_val) {
      opened.val.push_back({s.name, opened.train.probability(i), open(i, *s.val)});
      opened.description +=
          fmt::format("; val {} tokens ({})", opened.val.back().data.num_tokens(), *s.val);
    } else {
      opened.description += "; no validation";
    }
  }
  return opened;
}

double mixture_val_loss(const std::vector<SourceEval>& sources) {
  double weighted = 0.0, total = 0.0;
  for (const SourceEval& s : sources) {
    weighted += s.weight * s.loss;
    total += s.weight;
  }
  return total > 0.0 ? weighted / total : 0.0;
}

}  // namespace strata
