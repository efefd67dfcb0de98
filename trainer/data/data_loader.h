// Training and validation batches over memory-mapped token shards.
//
// Training samples are windows of seq_len + 1 tokens whose start is a pure function of
// (seed, step, global sample index): the data order does not depend on the number of ranks,
// and a resumed run sees exactly the samples an uninterrupted one would. Rank r of N with
// micro-batch size b at accumulation step a reads global indices
// a * (N * b) + r * b + [0, b).
// Validation reads consecutive, non-overlapping windows from the start of the val shards.
//
// Packed shards (instruction data, token_shard.h) hold whole windows of seq_len + 1 tokens:
// there a sample is one of those windows, drawn the same way, never a window across two.
// Shards with loss-mask companions give each batch the mask of its targets and where the
// packed documents start (what per-document attention needs).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "trainer/data/token_shard.h"

namespace strata {

// A batch of B windows, row-major (B, T): inputs are tokens [s, s+T), targets [s+1, s+T+1).
struct TokenBatch {
  int64_t batch = 0;
  int64_t seq_len = 0;
  std::vector<int64_t> inputs;   // (B, T)
  std::vector<int64_t> targets;  // (B, T)
  // (B, T): 1 where the target counts in the loss; empty when every target does.
  std::vector<uint8_t> loss_mask;
  // (B, T): 1 where the input token starts a document (a packed record); empty when the data
  // does not say (a token stream). Column 0 is always 1.
  std::vector<uint8_t> doc_start;
  int64_t target_count() const;  // targets that count in the loss
};

class TokenDataset {
 public:
  // Opens every shard matching `pattern`; checks each token is < vocab_size.
  TokenDataset(const std::string& pattern, int64_t seq_len, int64_t vocab_size);

  int64_t num_tokens() const { return total_tokens_; }
  int64_t seq_len() const { return seq_len_; }
  const std::vector<TokenShard>& shards() const { return shards_; }
  bool packed() const { return window_ > 0; }
  bool has_loss_mask() const { return !masks_.empty(); }
  // Batches carry doc_start (packed instruction data: its masks mark the documents).
  bool has_documents() const { return !masks_.empty(); }

  // Start (global token offset into the shard concatenation, never crossing a shard end) of
  // the window for (seed, step, index). Pure function.
  int64_t sample_start(uint64_t seed, int64_t step, int64_t global_index) const;

  // Windows for global indices [first_index, first_index + count) of `step`.
  TokenBatch sample_batch(uint64_t seed, int64_t step, int64_t first_index, int64_t count) const;
  // What sample_batch(...).target_count() gives, reading only the loss masks.
  int64_t sample_target_count(uint64_t seed, int64_t step, int64_t first_index,
                              int64_t count) const;

  // Number of whole consecutive windows (stride seq_len, each needs seq_len + 1 tokens)
  // available from the start of the shards.
  int64_t num_sequential_windows() const;
  // Consecutive windows [first_window, first_window + count).
  TokenBatch sequential_batch(int64_t first_window, int64_t count) const;

 private:
  // The shard holding global token `global_start`, and the token's index in it.
  std::pair<size_t, int64_t> locate(int64_t global_start) const;
  void read_window(int64_t global_start, TokenBatch& batch, int64_t row) const;
  int64_t windows_in(const TokenShard& shard) const;  // sequential windows
  std::vector<TokenShard> shards_;
  std::vector<TokenShard> masks_;       // one per shard, or none
  std::vector<int64_t> shard_offsets_;  // global token offset of each shard
  std::vector<int64_t> window_prefix_;  // prefix sums of valid window starts per shard
  int64_t total_tokens_ = 0;
  int64_t seq_len_ = 0;
  int64_t window_ = 0;  // packed: seq_len + 1; 0 for token streams
};

}  // namespace strata
