// Random training windows (pure function of seed, step, index) and sequential validation
// windows over memory-mapped token shards.
#include "trainer/data/data_loader.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <numeric>

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

int64_t TokenBatch::target_count() const {
  if (loss_mask.empty()) return batch * seq_len;
  return std::accumulate(loss_mask.begin(), loss_mask.end(), int64_t{0});
}

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
    // Packed or not, with a loss mask or not: every shard of the pattern alike.
    const std::string mask_path = mask_path_of(path);
    const bool masked = std::filesystem::exists(mask_path);
    if (!shards_.empty() && (shard.window() != window_ || masked != !masks_.empty())) {
      throw DataError(fmt::format(
          "the shards matching '{}' mix kinds: {} is {}{}, {} is {}{}\nHINT: give each kind of "
          "data its own pattern (prepare-data writes one kind per output directory)",
          pattern, shards_.front().path(), window_ ? "packed" : "a token stream",
          masks_.empty() ? "" : " with a loss mask", path,
          shard.window() ? "packed" : "a token stream", masked ? " with a loss mask" : ""));
    }
    window_ = shard.window();
    if (window_ > 0 && window_ != seq_len + 1) {
      throw DataError(fmt::format(
          "token shard {} is packed in windows of {} tokens, for data.seq_len {}, but "
          "data.seq_len is {}\nHINT: set data.seq_len to {}, or prepare the data again with "
          "--seq-len {}",
          path, window_, window_ - 1, seq_len, window_ - 1, seq_len));
    }
    if (masked) {
      TokenShard mask(mask_path);
      if (!mask.is_mask() || mask.size() != shard.size() || mask.window() != shard.window()) {
        throw DataError(fmt::format(
            "loss mask {} does not belong to token shard {}: {} entries{}, the shard has {} "
            "tokens\nHINT: (re)create both with `strata prepare-data`",
            mask_path, path, mask.size(), mask.is_mask() ? "" : " (not a loss mask)",
            shard.size()));
      }
      masks_.push_back(std::move(mask));
    }
    shard_offsets_.push_back(total_tokens_);
    total_tokens_ += shard.size();
    // Window starts: any token with T more after it, or (packed) every window's first token.
    const int64_t starts =
        window_ > 0 ? shard.size() / window_ : std::max<int64_t>(0, shard.size() - seq_len);
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
  return shard_offsets_[s] + (k - before) * std::max<int64_t>(window_, 1);
}

std::pair<size_t, int64_t> TokenDataset::locate(int64_t global_start) const {
  const size_t s = std::upper_bound(shard_offsets_.begin(), shard_offsets_.end(), global_start) -
                   shard_offsets_.begin() - 1;
  return {s, global_start - shard_offsets_[s]};
}

void TokenDataset::read_window(int64_t global_start, TokenBatch& batch, int64_t row) const {
  const auto [s, local] = locate(global_start);
  shards_[s].read(local, seq_len_, batch.inputs.data() + row * seq_len_);
  shards_[s].read(local + 1, seq_len_, batch.targets.data() + row * seq_len_);
  if (masks_.empty()) return;
  const TokenShard& mask = masks_[s];
  uint8_t* loss_mask = batch.loss_mask.data() + row * seq_len_;
  uint8_t* doc_start = batch.doc_start.data() + row * seq_len_;
  for (int64_t t = 0; t < seq_len_; ++t) {
    loss_mask[t] = (mask.token(local + 1 + t) & kMaskTarget) ? 1 : 0;
    doc_start[t] = t == 0 || (mask.token(local + t) & kMaskDocumentStart) ? 1 : 0;
  }
}

namespace {
TokenBatch empty_batch(int64_t count, int64_t seq_len, bool masked) {
  const int64_t mask_size = masked ? count * seq_len : 0;
  return TokenBatch{count,
                    seq_len,
                    std::vector<int64_t>(count * seq_len),
                    std::vector<int64_t>(count * seq_len),
                    std::vector<uint8_t>(mask_size),
                    std::vector<uint8_t>(mask_size)};
}
}  // namespace

TokenBatch TokenDataset::sample_batch(uint64_t seed, int64_t step, int64_t first_index,
                                      int64_t count) const {
  TokenBatch batch = empty_batch(count, seq_len_, has_loss_mask());
  for (int64_t i = 0; i < count; ++i) {
    read_window(sample_start(seed, step, first_index + i), batch, i);
  }
  return batch;
}

int64_t TokenDataset::sample_target_count(uint64_t seed, int64_t step, int64_t first_index,
                                          int64_t count) const {
  if (masks_.empty()) return count * seq_len_;
  int64_t targets = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto [s, local] = locate(sample_start(seed, step, first_index + i));
    for (int64_t t = 1; t <= seq_len_; ++t) targets += masks_[s].token(local + t) & kMaskTarget;
  }
  return targets;
}

// Sequential windows: shard by shard, window w of a shard starts at w * seq_len and needs
// seq_len + 1 tokens, so a shard of n tokens holds (n - 1) / seq_len windows; packed shards
// hold n / (seq_len + 1) whole windows.
int64_t TokenDataset::num_sequential_windows() const {
  int64_t n = 0;
  for (const TokenShard& shard : shards_) n += windows_in(shard);
  return n;
}

int64_t TokenDataset::windows_in(const TokenShard& shard) const {
  return window_ > 0 ? shard.size() / window_ : std::max<int64_t>(0, shard.size() - 1) / seq_len_;
}

TokenBatch TokenDataset::sequential_batch(int64_t first_window, int64_t count) const {
  TokenBatch batch = empty_batch(count, seq_len_, has_loss_mask());
  const int64_t stride = window_ > 0 ? window_ : seq_len_;
  int64_t window = first_window;
  for (int64_t i = 0; i < count; ++i, ++window) {
    int64_t w = window;
    size_t s = 0;
    for (; s < shards_.size(); ++s) {
      if (w < windows_in(shards_[s])) break;
      w -= windows_in(shards_[s]);
    }
    if (s == shards_.size()) {
      throw std::out_of_range(fmt::format("sequential window {} beyond the {} available", window,
                                          num_sequential_windows()));
    }
    read_window(shard_offsets_[s] + w * stride, batch, i);
  }
  return batch;
}

}  // namespace strata
