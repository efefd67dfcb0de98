// Llama <-> Hugging Face LlamaForCausalLM.
#include "checkpoint/hf_llama.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <regex>
#include <utility>
#include <vector>

#include "checkpoint/safetensors.h"

namespace strata {
namespace {

// Per-layer names: internal suffix <-> HF suffix.
const std::vector<std::pair<std::string, std::string>>& layer_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"attention.wq.weight", "self_attn.q_proj.weight"},
      {"attention.wk.weight", "self_attn.k_proj.weight"},
      {"attention.wv.weight", "self_attn.v_proj.weight"},
      {"attention.wo.weight", "self_attn.o_proj.weight"},
      {"feed_forward.w1.weight", "mlp.gate_proj.weight"},
      {"feed_forward.w3.weight", "mlp.up_proj.weight"},
      {"feed_forward.w2.weight", "mlp.down_proj.weight"},
      {"attention_norm.weight", "input_layernorm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"}};
  return names;
}

const std::vector<std::pair<std::string, std::string>>& global_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"tok_embeddings.weight", "model.embed_tokens.weight"},
      {"norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"}};
  return names;
}

// Rows of each head (head_dim rows): interleaved pairs (2i, 2i+1) <-> rotate-half halves
// (i, i + d/2). Works on any block of whole heads.
at::Tensor interleaved_to_half(const at::Tensor& w, int64_t head_dim) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({rows / head_dim, head_dim / 2, 2, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

at::Tensor half_to_interleaved(const at::Tensor& w, int64_t head_dim) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({rows / head_dim, 2, head_dim / 2, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

}  // namespace

LlamaStateDictAdapter::LlamaStateDictAdapter(LlamaShape shape) : shape_(shape) {}

std::string LlamaStateDictAdapter::hf_key(const std::string& fqn) const {
  for (const auto& [internal, hf] : global_names()) {
    if (fqn == internal) return hf;
  }
  static const std::regex layer(R"(layers\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(fqn, m, layer)) {
    for (const auto& [internal, hf] : layer_names()) {
      if (m[2] == internal) return fmt::format("model.layers.{}.{}", m[1].str(), hf);
    }
  }
  throw CheckpointError(fmt::format("no Hugging Face name for parameter '{}'", fqn));
}

std::string LlamaStateDictAdapter::internal_key(const std::string& hf_key) const {
  for (const auto& [internal, hf] : global_names()) {
    if (hf_key == hf) return internal;
  }
  static const std::regex layer(R"(model\.layers\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(hf_key, m, layer)) {
    for (const auto& [internal, hf] : layer_names()) {
      if (m[2] == hf) return fmt::format("layers.{}.{}", m[1].str(), internal);
    }
  }
  throw CheckpointError(fmt::format("'{}' is not a LlamaForCausalLM weight this model has", hf_key));
}

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

bool LlamaStateDictAdapter::permuted(const std::string& fqn) {
  return ends_with(fqn, "attention.wq.weight") || ends_with(fqn, "attention.wk.weight");
}

at::Tensor LlamaStateDictAdapter::to_hf(const std::string& fqn, const at::Tensor& t) const {
  return permuted(fqn) ? interleaved_to_half(t, shape_.head_dim()) : t;
}

at::Tensor LlamaStateDictAdapter::from_hf(const std::string& fqn, const at::Tensor& t) const {
  return permuted(fqn) ? half_to_interleaved(t, shape_.head_dim()) : t;
}

StateDict LlamaStateDictAdapter::to_hf(const StateDict& internal) const {
  StateDict out;
  for (const auto& [fqn, t] : internal) out.insert(hf_key(fqn), to_hf(fqn, t));
  return out;
}

StateDict LlamaStateDictAdapter::from_hf(const StateDict& hf) const {
  StateDict out;
  std::vector<std::string> unexpected;
  for (const auto& [key, t] : hf) {
    if (ends_with(key, "rotary_emb.inv_freq")) continue;  // a non-persistent buffer
    if (key == "lm_head.weight" && shape_.tie_embeddings) continue;  // tied: the embedding serves
    std::string fqn;
    try {
      fqn = internal_key(key);
    } catch (const CheckpointError&) {
      unexpected.push_back(key);
      continue;
    }
    out.insert(fqn, from_hf(fqn, t));
  }
  if (!unexpected.empty()) {
    throw CheckpointError(fmt::format("unexpected keys for a Llama: {}", fmt::join(unexpected, ", ")));
  }
  if (!shape_.tie_embeddings && !out.contains("output.weight") && out.contains("tok_embeddings.weight")) {
    out.insert("output.weight", out.at("tok_embeddings.weight").clone());  // a tied source
  }
  return out;
}

nlohmann::ordered_json LlamaStateDictAdapter::config_json(const std::string& dtype, int64_t bos_token_id,
                                                  int64_t eos_token_id) const {
  // nlohmann writes a double with a fraction or exponent ("10000.0", "1e-05"), as transformers
  // v5's strict float fields require.
  nlohmann::ordered_json c;
  c["architectures"] = {"LlamaForCausalLM"};
  c["model_type"] = "llama";
  c["vocab_size"] = shape_.vocab_size;
  c["hidden_size"] = shape_.dim;
  c["intermediate_size"] = shape_.ffn_hidden_dim;
  c["num_hidden_layers"] = shape_.n_layers;
  c["num_attention_heads"] = shape_.n_heads;
  c["num_key_value_heads"] = shape_.n_kv_heads;
  c["head_dim"] = shape_.head_dim();
  c["hidden_act"] = "silu";
  c["max_position_embeddings"] = shape_.max_seq_len;
  c["rms_norm_eps"] = shape_.norm_eps;
  c["initializer_range"] = 0.02;
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["mlp_bias"] = false;
  c["pretraining_tp"] = 1;
  c["tie_word_embeddings"] = shape_.tie_embeddings;
  c["use_cache"] = true;
  c["bos_token_id"] = bos_token_id;
  c["eos_token_id"] = eos_token_id;
  c["pad_token_id"] = nullptr;
  c["rope_theta"] = shape_.rope_theta;
  c["rope_scaling"] = nullptr;
  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", shape_.rope_theta}};
  c["torch_dtype"] = dtype;
  c["dtype"] = dtype;
  c["transformers_version"] = "4.56.0";
  return c;
}

nlohmann::json LlamaStateDictAdapter::generation_config_json(int64_t bos_token_id, int64_t eos_token_id) {
  return {{"_from_model_config", true},
          {"bos_token_id", bos_token_id},
          {"eos_token_id", eos_token_id},
          {"transformers_version", "4.56.0"}};
}

LlamaShape LlamaStateDictAdapter::shape_from_config(const nlohmann::json& c, const std::string& where) {
  auto fail = [&](const std::string& what) {
    throw CheckpointError(fmt::format("{}: {}\nHINT: Strata loads plain Llama checkpoints "
                                      "(LlamaForCausalLM with SiLU, without biases or RoPE scaling)",
                                      where, what));
  };
  // transformers gives a null field its default value.
  auto given = [&](const char* key) { return c.contains(key) && !c[key].is_null(); };
  auto field_or = [&](const char* key, auto fallback) {
    return given(key) ? c[key].get<decltype(fallback)>() : fallback;
  };
  try {
    if (c.value("model_type", std::string()) != "llama") {
      fail(fmt::format("model_type is '{}', not 'llama'", c.value("model_type", std::string("(missing)"))));
    }
    LlamaShape s;
    s.vocab_size = c.at("vocab_size").get<int64_t>();
    s.dim = c.at("hidden_size").get<int64_t>();
    s.ffn_hidden_dim = c.at("intermediate_size").get<int64_t>();
    s.n_layers = c.at("num_hidden_layers").get<int64_t>();
    s.n_heads = c.at("num_attention_heads").get<int64_t>();
    s.n_kv_heads = field_or("num_key_value_heads", s.n_heads);
    s.max_seq_len = field_or("max_position_embeddings", int64_t{2048});
    s.norm_eps = field_or("rms_norm_eps", 1e-6);
    s.tie_embeddings = field_or("tie_word_embeddings", false);
    // RoPE as transformers reads it: a non-empty rope_scaling wins over rope_parameters; the
    // type is "rope_type" (older files: "type"); rope_theta inside wins over the top-level one.
    double theta = field_or("rope_theta", 10000.0);
    for (const char* field : {"rope_scaling", "rope_parameters"}) {
      if (!given(field) || (c[field].is_object() && c[field].empty())) continue;
      const nlohmann::json& rp = c[field];
      if (!rp.is_object()) fail(fmt::format("{} is not an object", field));
      const std::string type = rp.contains("rope_type") && !rp["rope_type"].is_null()
                                   ? rp["rope_type"].get<std::string>()
                                   : rp.value("type", std::string("default"));
      if (type != "default") {
        fail(fmt::format("{}.rope_type '{}' is not supported (only the default RoPE is)", field, type));
      }
      if (rp.contains("rope_theta") && !rp["rope_theta"].is_null()) theta = rp["rope_theta"].get<double>();
      break;
    }
    s.rope_theta = theta;
    const std::string act = field_or("hidden_act", std::string("silu"));
    if (act != "silu" && act != "swish") {
      fail(fmt::format("hidden_act '{}' is not supported (the MLP is SwiGLU: silu)", act));
    }
    for (const char* bias : {"attention_bias", "mlp_bias"}) {
      if (field_or(bias, false)) fail(fmt::format("{} is true: biases are not supported", bias));
    }
    if (s.n_heads <= 0 || s.dim % s.n_heads != 0) fail("hidden_size is not a multiple of num_attention_heads");
    if (given("head_dim") && c["head_dim"].get<int64_t>() != s.head_dim()) {
      fail(fmt::format("head_dim {} differs from hidden_size / num_attention_heads = {}",
                       c["head_dim"].get<int64_t>(), s.head_dim()));
    }
    if (s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0) {
      fail("num_attention_heads is not a multiple of num_key_value_heads");
    }
    return s;
  } catch (const nlohmann::json::exception& e) {
    fail(fmt::format("invalid or missing field ({})", e.what()));
  }
  return {};
}

}  // namespace strata
