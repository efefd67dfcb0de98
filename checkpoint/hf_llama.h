// The Hugging Face Llama StateDictAdapter (docs/formats.md): internal (torchtitan) FQNs <->
// LlamaForCausalLM keys, the q/k row permutation between Strata's interleaved RoPE and HF's
// rotate-half RoPE, and config.json / generation_config.json <-> the model shape.
// from_hf(to_hf(sd)) == sd bit for bit (the permutation only moves rows).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "trainer/state_dict.h"

namespace strata {

// What the adapter needs to know of a Llama (the trainer converts its ModelConfig).
struct LlamaShape {
  int64_t vocab_size = 0, dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0;
  int64_t ffn_hidden_dim = 0, max_seq_len = 0;
  double norm_eps = 1e-5, rope_theta = 10000.0;
  bool tie_embeddings = false;
  int64_t head_dim() const { return dim / n_heads; }
};

class LlamaStateDictAdapter {
 public:
  explicit LlamaStateDictAdapter(LlamaShape shape);
  const LlamaShape& shape() const { return shape_; }

  // Key mapping; throws CheckpointError naming an unknown key.
  std::string hf_key(const std::string& fqn) const;
  std::string internal_key(const std::string& hf_key) const;

  // One tensor in the other layout (wq / wk rows permuted per head; others unchanged). For
  // wq / wk any block of whole heads (a multiple of head_dim rows) converts on its own.
  static bool permuted(const std::string& fqn);
  at::Tensor to_hf(const std::string& fqn, const at::Tensor& tensor) const;
  at::Tensor from_hf(const std::string& fqn, const at::Tensor& tensor) const;

  // Whole state dicts, in HF order (embedding, layers, norm, lm_head) for to_hf and in the
  // model's order for from_hf. from_hf drops rotary `inv_freq` buffers, and for an untied
  // model whose HF checkpoint is tied (no lm_head.weight) copies the embedding into
  // output.weight. Unknown keys are errors naming them.
  StateDict to_hf(const StateDict& internal) const;
  StateDict from_hf(const StateDict& hf) const;

  // config.json (docs/formats.md: floats as floats, rope_theta and rope_parameters,
  // torch_dtype and dtype) for tensors of `dtype` ("float32", "bfloat16", "float16").
  nlohmann::ordered_json config_json(const std::string& dtype, int64_t bos_token_id,
                             int64_t eos_token_id) const;
  static nlohmann::json generation_config_json(int64_t bos_token_id, int64_t eos_token_id);
  // The shape a config.json describes; `where` names the file in errors (missing or
  // unsupported fields: rope scaling, biases, head_dim != hidden/heads).
  static LlamaShape shape_from_config(const nlohmann::json& config, const std::string& where);

 private:
  LlamaShape shape_;
};

}  // namespace strata
