// The small Llama the trainer tests use: 2 layers, dim 32, 4 heads sharing 2 key/value heads.
#pragma once

#include "trainer/config/config.h"

namespace strata::testing {

inline ModelConfig micro_model(int64_t vocab_size, int64_t max_seq_len, bool tied = false) {
  ModelConfig c;
  c.vocab_size = vocab_size;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.multiple_of = 16;
  c.max_seq_len = max_seq_len;
  c.tie_embeddings = tied;
  return c;
}

}  // namespace strata::testing
