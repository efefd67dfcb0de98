// Weighted mixtures of training datasets (data.sources).
//
// Sample `global_index` of `step` comes from source k with probability weight_k / sum(weights):
// the source is drawn from a hash chain of (seed, step, global index) kept apart from the one
// that places windows (TokenDataset::sample_start), and the window inside that source is the
// source's own sample_start(seed, step, global index). Like a single dataset, a batch is then a
// pure function of (seed, step, indices): it does not depend on the number of ranks or the
// micro-batch split, and a resumed run draws what the uninterrupted one did.
//
// A mixture of one source draws nothing: it is that TokenDataset, bit for bit.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "trainer/config/config.h"
#include "trainer/data/data_loader.h"

namespace strata {

struct MixtureSource {
  std::string name;
  double weight = 1.0;  // > 0; normalised over the sources
  TokenDataset data;
};

class DataMixture {
 public:
  // Throws DataError when there is no source, a weight is not positive and finite, or the
  // sources do not share one seq_len.
  explicit DataMixture(std::vector<MixtureSource> sources);

  size_t num_sources() const { return sources_.size(); }
  const MixtureSource& source(size_t k) const { return sources_[k]; }
  double probability(size_t k) const;  // the normalised weight of source k
  int64_t seq_len() const { return sources_.front().data.seq_len(); }
  // True when any source has a loss mask; rows of the others then count every target.
  bool has_loss_mask() const { return masked_; }
  // True when any source marks where documents start; rows of the others are one document.
  bool has_documents() const { return documents_; }

  // The source of sample `global_index` of `step`: a pure function (0 with one source).
  size_t source_of(uint64_t seed, int64_t step, int64_t global_index) const;
  // Samples per source among global indices [first_index, first_index + count) of `step`.
  std::vector<int64_t> source_counts(uint64_t seed, int64_t step, int64_t first_index,
                                     int64_t count) const;

  // As TokenDataset: windows for global indices [first_index, first_index + count) of `step`.
  TokenBatch sample_batch(uint64_t seed, int64_t step, int64_t first_index, int64_t count) const;
  int64_t sample_target_count(uint64_t seed, int64_t step, int64_t first_index,
                              int64_t count) const;

 private:
  std::vector<MixtureSource> sources_;
  std::vector<double> cumulative_;  // normalised cumulative weights; the last is 1
  bool masked_ = false;
  bool documents_ = false;
};

// data.sources opened: the training mixture, each source's validation set (`with_val`: for
// the sources with a val pattern; normalised weights), and a description for the log. Errors
// name the source.
struct OpenedSources {
  DataMixture train;
  std::vector<MixtureSource> val;
  std::string description;
};
OpenedSources open_data_sources(const DataConfig& data, int64_t vocab_size, bool with_val);

// One source's validation result.
struct SourceEval {
  std::string name;
  double weight = 1.0;  // the source's mixture weight
  double loss = 0.0;
  int64_t tokens = 0;
};

// The mixture's validation loss: the mean of the sources' losses weighted by their mixture
// weights, renormalised over the sources given (those with validation data).
double mixture_val_loss(const std::vector<SourceEval>& sources);

}  // namespace strata
