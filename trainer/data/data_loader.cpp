// Random training windows (pure function of seed, step, index) and sequential validation
// windows over memory-mapped token shards.
#include "trainer/data/data_loader.h"

#include <fmt/format.h>

#include <algorithm>

#include "trainer/seed.h"

namespace strata {
namespace {

// Uniform integer in [0, n) from a 64-bit hash without modulo bias (Lemire's multiply-shift,
// with rejection of the biased low range; the rejection loop re-hashes deterministically).
uint64_t uniform_below(uint64_t hash, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;
  for (;;) {
    const unsigned __int128 product = static_cast<unsigned __int128>(hash) * n;
    if (static_cast<uint64_t>(product) >= threshold) return static_cast<uint64_t>(product >> 64);
    hash = splitmix64(hash);
  }
}

}  // namespace

TokenDataset::TokenDataset(const std::string& pattern, int64_t seq_len, int64_t vocab_size)
    : seq_len_(seq_len) {
  if (seq_len <= 0 || vocab_size <= 0) {
    throw DataError(
        fmt::format("cannot read '{}' with data.seq_len {} and model.vocab_size {}: "
                    "both must be positive",
                    pattern, seq_len, vocab_size));
  }
  for (const std::string& path : expand_shard_pattern(pattern)) {
    TokenShard shard(path);
    const uint32_t max_token = shard.max_token();
    if (shard.size() > 0 && static_cast<int64_t>(max_token) >= vocab_size) {
      throw DataError(
          fmt::format("token shard {} holds token id {}, outside model.vocab_size {}\nHINT: set "
                      "model.vocab_size to the tokenizer's vocabulary size (at least {})",
                      path, max_token, vocab_size, static_cast<int64_t>(max_token) + 1));
    }
    shard_offsets_.push_back(total_tokens_);
    total_tokens_ += shard.size();
    const int64_t starts = std::max<int64_t>(0, shard.size() - seq_len);  // needs T+1 tokens
    window_prefix_.push_back((window_prefix_.empty() ? 0 : window_prefix_.back()) + starts);
    shards_.push_back(std::move(shard));
  }
  if (window_prefix_.back() == 0) {
    throw DataError(fmt::format(
        "the shards matching '{}' hold {} tokens, but no shard has the {} tokens one window of "
        "data.seq_len {} + 1 needs\nHINT: lower data.seq_len or prepare more text",
        pattern, total_tokens_, seq_len + 1, seq_len));
  }
}

int64_t TokenDataset::sample_start(uint64_t seed, int64_t step, int64_t global_index) const {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(step));
  h = splitmix64(h ^ static_cast<uint64_t>(global_index));
  const int64_t k = static_cast<int64_t>(uniform_below(h, window_prefix_.back()));
  // Shard s holds window starts [prefix[s-1], prefix[s]).
  const size_t s =
      std::upper_bound(window_prefix_.begin(), window_prefix_.end(), k) - window_prefix_.begin();
  const int64_t before = s == 0 ? 0 : window_prefix_[s - 1];
  return shard_offsets_[s] + (k - before);
}

void TokenDataset::read_window(int64_t global_start, int64_t* inputs, int64_t* targets) const {
  const size_t s = std::upper_bound(shard_offsets_.begin(), shard_offsets_.end(), global_start) -
                   shard_offsets_.begin() - 1;
  const int64_t local = global_start - shard_offsets_[s];
  shards_[s].read(local, seq_len_, inputs);
  shards_[s].read(local + 1, seq_len_, targets);
}

TokenBatch TokenDataset::sample_batch(uint64_t seed, int64_t step, int64_t first_index,
                                      int64_t count) const {
  TokenBatch batch{count, seq_len_, std::vector<int64_t>(count * seq_len_),
                   std::vector<int64_t>(count * seq_len_)};
  for (int64_t i = 0; i < count; ++i) {
    read_window(sample_start(seed, step, first_index + i), batch.inputs.data() + i * seq_len_,
                batch.targets.data() + i * seq_len_);
  }
  return batch;
}

// Sequential windows: shard by shard, window w of a shard starts at w * seq_len and needs
// seq_len + 1 tokens, so a shard of n tokens holds (n - 1) / seq_len windows.
int64_t TokenDataset::num_sequential_windows() const {
  int64_t n = 0;
  for (const TokenShard& shard : shards_) n += std::max<int64_t>(0, shard.size() - 1) / seq_len_;
  return n;
}

TokenBatch TokenDataset::sequential_batch(int64_t first_window, int64_t count) const {
  TokenBatch batch{count, seq_len_, std::vector<int64_t>(count * seq_len_),
                   std::vector<int64_t>(count * seq_len_)};
  int64_t window = first_window;
  size_t s = 0;
  for (int64_t i = 0; i < count; ++i, ++window) {
    int64_t w = window;
    for (s = 0; s < shards_.size(); ++s) {
      const int64_t in_shard = std::max<int64_t>(0, shards_[s].size() - 1) / seq_len_;
      if (w < in_shard) break;
      w -= in_shard;
    }
    if (s == shards_.size()) {
      throw std::out_of_range(fmt::format("sequential window {} beyond the {} available", window,
                                          num_sequential_windows()));
    }
    shards_[s].read(w * seq_len_, seq_len_, batch.inputs.data() + i * seq_len_);
    shards_[s].read(w * seq_len_ + 1, seq_len_, batch.targets.data() + i * seq_len_);
  }
  return batch;
}

}  // namespace strata
