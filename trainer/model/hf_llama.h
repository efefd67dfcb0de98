// The Hugging Face Llama StateDictAdapter (docs/formats.md): internal (torchtitan) FQNs <->
// LlamaForCausalLM keys, the q/k row permutation between Strata's interleaved RoPE and HF's
// rotate-half RoPE, and config.json / generation_config.json <-> the model shape.
// from_hf(to_hf(sd)) == sd bit for bit (the permutation only moves rows).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include <vector>

#include "trainer/config/config.h"
#include "trainer/model/state_dict.h"

namespace strata {

class LlamaStateDictAdapter {
 public:
  explicit LlamaStateDictAdapter(ModelConfig config);
  const ModelConfig& config() const { return config_; }

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
  // torch_dtype and dtype) for tensors of `dtype` ("float32", "bfloat16", "float16"). The
  // model fields come from model_config_json (the config schema) through one name table.
  nlohmann::ordered_json config_json(const std::string& dtype, int64_t bos_token_id,
                                     int64_t eos_token_id) const;
  static nlohmann::json generation_config_json(int64_t bos_token_id, int64_t eos_token_id);
  // The model config a config.json describes, read through the same name table (the SwiGLU
  // width reproduced exactly); `where` names the file in errors (missing or unsupported
  // fields: rope scaling, biases, head_dim != hidden/heads, a width no SwiGLU gives).
  static ModelConfig model_config_from_hf(const nlohmann::json& config, const std::string& where);
  // Where a run's model and an HF model's differ, one line per field in both names
  // ("model.dim = 64 but hidden_size = 32"); empty when the HF weights fit the run's model.
  static std::vector<std::string> differences(const ModelConfig& ours, const ModelConfig& theirs);
  // The HF module of a block linear: "wq" -> "self_attn.q_proj", "w1" -> "mlp.gate_proj".
  static std::string hf_module(const std::string& linear);

 private:
  ModelConfig config_;
};

}  // namespace strata
