// Autoregressive sampling from a Llama (full recompute per token; the context is cropped to
// the model's max_seq_len).
#pragma once

#include <cstdint>
#include <vector>

#include "trainer/model/llama.h"

namespace strata {

struct SamplingOptions {
  int64_t max_new_tokens = 48;
  double temperature = 0.8;  // 0: greedy
  int64_t top_k = 0;         // > 0: sample among the k most likely tokens only
  uint64_t seed = 0;
  int64_t stop_token = -1;  // stop after sampling this token (e.g. BOS/EOS), -1: never
};

// Returns only the new tokens.
std::vector<int64_t> generate(const LanguageModel& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& options);

}  // namespace strata
