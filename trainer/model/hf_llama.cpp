// Llama <-> Hugging Face LlamaForCausalLM.
#include "trainer/model/hf_llama.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cmath>
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

// config.json fields that carry a model key, and that key in model_config_json. The rest of
// config.json is fixed for a plain Llama.
const std::vector<std::pair<std::string, std::string>>& hf_fields() {
  static const std::vector<std::pair<std::string, std::string>> fields = {
      {"vocab_size", "vocab_size"},
      {"hidden_size", "dim"},
      {"intermediate_size", "ffn_hidden_dim"},
      {"num_hidden_layers", "n_layers"},
      {"num_attention_heads", "n_heads"},
      {"num_key_value_heads", "n_kv_heads"},
      {"max_position_embeddings", "max_seq_len"},
      {"rms_norm_eps", "norm_eps"},
      {"rope_theta", "rope_theta"},
      {"tie_word_embeddings", "tie_embeddings"}};
  return fields;
}

// Rows of each head (head_dim rows): interleaved pairs (2i, 2i+1) <-> rotate-half halves
// (i, i + d/2). Works on any block of whole heads.
at::Tensor interleaved_to_half(const at::Tensor& w, int64_t head_dim) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({rows / head_dim, head_dim / 2, 2, cols})
      .transpose(1, 2)
      .reshape({rows, cols})
      .contiguous();
}

at::Tensor half_to_interleaved(const at::Tensor& w, int64_t head_dim) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({rows / head_dim, 2, head_dim / 2, cols})
      .transpose(1, 2)
      .reshape({rows, cols})
      .contiguous();
}

}  // namespace

LlamaStateDictAdapter::LlamaStateDictAdapter(ModelConfig config) : config_(std::move(config)) {}

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
  throw CheckpointError(
      fmt::format("'{}' is not a LlamaForCausalLM weight this model has", hf_key));
}

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

bool LlamaStateDictAdapter::permuted(const std::string& fqn) {
  return ends_with(fqn, "attention.wq.weight") || ends_with(fqn, "attention.wk.weight");
}

at::Tensor LlamaStateDictAdapter::to_hf(const std::string& fqn, const at::Tensor& t) const {
  return permuted(fqn) ? interleaved_to_half(t, config_.head_dim()) : t;
}

at::Tensor LlamaStateDictAdapter::from_hf(const std::string& fqn, const at::Tensor& t) const {
  return permuted(fqn) ? half_to_interleaved(t, config_.head_dim()) : t;
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
    if (ends_with(key, "rotary_emb.inv_freq")) continue;              // a non-persistent buffer
    if (key == "lm_head.weight" && config_.tie_embeddings) continue;  // tied: the embedding serves
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
    throw CheckpointError(
        fmt::format("unexpected keys for a Llama: {}", fmt::join(unexpected, ", ")));
  }
  if (!config_.tie_embeddings && !out.contains("output.weight") &&
      out.contains("tok_embeddings.weight")) {
    out.insert("output.weight", out.at("tok_embeddings.weight").clone());  // a tied source
  }
  return out;
}

nlohmann::ordered_json LlamaStateDictAdapter::config_json(const std::string& dtype,
                                                          int64_t bos_token_id,
                                                          int64_t eos_token_id) const {
  // nlohmann writes a double with a fraction or exponent ("10000.0", "1e-05"), as transformers
  // v5's strict float fields require.
  nlohmann::ordered_json c;
  c["architectures"] = {"LlamaForCausalLM"};
  c["model_type"] = "llama";
  const nlohmann::json model = model_config_json(config_);
  for (const auto& [hf, key] : hf_fields()) c[hf] = model.at(key);
  c["head_dim"] = config_.head_dim();
  c["hidden_act"] = "silu";
  c["initializer_range"] = 0.02;
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["mlp_bias"] = false;
  c["pretraining_tp"] = 1;
  c["tie_word_embeddings"] = config_.tie_embeddings;
  c["use_cache"] = true;
  // A tokenizer without BOS (or EOS) has -1: null in the file.
  c["bos_token_id"] =
      bos_token_id >= 0 ? nlohmann::ordered_json(bos_token_id) : nlohmann::ordered_json();
  c["eos_token_id"] =
      eos_token_id >= 0 ? nlohmann::ordered_json(eos_token_id) : nlohmann::ordered_json();
  c["pad_token_id"] = nullptr;
  c["rope_scaling"] = nullptr;
  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", config_.rope_theta}};
  c["torch_dtype"] = dtype;
  c["dtype"] = dtype;
  c["transformers_version"] = "4.56.0";
  return c;
}

nlohmann::json LlamaStateDictAdapter::generation_config_json(int64_t bos_token_id,
                                                             int64_t eos_token_id) {
  return {{"_from_model_config", true},
          {"bos_token_id", bos_token_id >= 0 ? nlohmann::json(bos_token_id) : nlohmann::json()},
          {"eos_token_id", eos_token_id >= 0 ? nlohmann::json(eos_token_id) : nlohmann::json()},
          {"transformers_version", "4.56.0"}};
}

ModelConfig LlamaStateDictAdapter::model_config_from_hf(const nlohmann::json& c,
                                                        const std::string& where) {
  auto fail = [&](const std::string& what) {
    throw CheckpointError(
        fmt::format("{}: {}\nHINT: Strata loads plain Llama checkpoints "
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
      fail(fmt::format("model_type is '{}', not 'llama'",
                       c.value("model_type", std::string("(missing)"))));
    }
    // Sizes are positive whole numbers (1e9 is one, written as a float; 512.5 and -4 are not),
    // within the largest size a config may give.
    for (const char* key :
         {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim"}) {
      if (!given(key)) continue;
      const nlohmann::json& v = c[key];
      const double x = v.is_number() ? v.get<double>() : std::nan("");
      std::string problem;
      if (!v.is_number() || std::isnan(x)) {
        problem = "not a number";
      } else if (!std::isfinite(x) || x != std::floor(x)) {
        problem = "not a whole number";
      } else if (x <= 0) {
        problem = "not a positive size";
      } else if (x > static_cast<double>(kMaxModelSize)) {
        problem = fmt::format("more than {} (2^31), larger than any model uses", kMaxModelSize);
      }
      if (!problem.empty()) {
        throw CheckpointError(fmt::format(
            "{}: {} is {}, {}\nHINT: correct {} in {}: the sizes of config.json are positive "
            "whole numbers",
            where, key, v.dump(), problem, key, where));
      }
    }
    // transformers' defaults for the optional fields.
    nlohmann::json hf = {
        {"max_position_embeddings", 2048}, {"rms_norm_eps", 1e-6}, {"tie_word_embeddings", false}};
    hf["num_key_value_heads"] = c.at("num_attention_heads");
    for (const auto& [name, key] : hf_fields()) {
      if (given(name.c_str())) hf[name] = c[name];
    }
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
        fail(fmt::format("{}.rope_type '{}' is not supported (only the default RoPE is)", field,
                         type));
      }
      if (rp.contains("rope_theta") && !rp["rope_theta"].is_null())
        theta = rp["rope_theta"].get<double>();
      break;
    }
    hf["rope_theta"] = theta;
    const std::string act = field_or("hidden_act", std::string("silu"));
    if (act != "silu" && act != "swish") {
      fail(fmt::format("hidden_act '{}' is not supported (the MLP is SwiGLU: silu)", act));
    }
    for (const char* bias : {"attention_bias", "mlp_bias"}) {
      if (field_or(bias, false)) fail(fmt::format("{} is true: biases are not supported", bias));
    }
    // The model keys by their schema names; multiple_of (and, for a width below int(8 dim / 3),
    // ffn_dim_multiplier) reproduce intermediate_size exactly in Meta's formula
    // multiple_of * ceil(m * int(8 dim / 3) / multiple_of).
    nlohmann::json model = model_config_json(ModelConfig());
    for (const auto& [name, key] : hf_fields()) model[key] = hf.at(name);
    const int64_t dim = model["dim"], width = model["ffn_hidden_dim"], base = 2 * (4 * dim) / 3;
    model["multiple_of"] = width;
    model["ffn_dim_multiplier"] =
        width < base ? nlohmann::json(static_cast<double>(width) / base) : nlohmann::json();
    ModelConfig m = model_config_from_json(model, where);
    if (m.ffn_hidden_dim() != width) {
      fail(fmt::format("intermediate_size {} cannot be expressed as a SwiGLU width of dim {}",
                       width, dim));
    }
    if (m.n_heads <= 0 || m.dim % m.n_heads != 0)
      fail("hidden_size is not a multiple of num_attention_heads");
    if (given("head_dim") && c["head_dim"].get<int64_t>() != m.head_dim()) {
      fail(fmt::format("head_dim {} differs from hidden_size / num_attention_heads = {}",
                       c["head_dim"].get<int64_t>(), m.head_dim()));
    }
    if (m.n_kv_heads <= 0 || m.n_heads % m.n_kv_heads != 0) {
      fail("num_attention_heads is not a multiple of num_key_value_heads");
    }
    return m;
  } catch (const nlohmann::json::exception& e) {
    fail(fmt::format("invalid or missing field ({})", e.what()));
  }
  return {};
}

std::vector<std::string> LlamaStateDictAdapter::differences(const ModelConfig& ours,
                                                            const ModelConfig& theirs) {
  const nlohmann::json a = model_config_json(ours), b = model_config_json(theirs);
  std::vector<std::string> out;
  for (const auto& [hf, key] : hf_fields()) {
    if (key == "max_seq_len" || key == "tie_embeddings") continue;  // no bearing on the weights
    if (a.at(key) != b.at(key))
      out.push_back(
          fmt::format("model.{} = {} but {} = {}", key, a.at(key).dump(), hf, b.at(key).dump()));
  }
  if (ours.tie_embeddings && !theirs.tie_embeddings) {
    out.push_back("model.tie_embeddings = true but tie_word_embeddings = false");
  }
  return out;
}

std::string LlamaStateDictAdapter::hf_module(const std::string& linear) {
  for (const auto& [internal, hf] : layer_names()) {
    const size_t dot = internal.find('.');
    if (internal.compare(dot + 1, std::string::npos, linear + ".weight") == 0)
      return hf.substr(0, hf.size() - 7);
  }
  throw CheckpointError(fmt::format("'{}' is not a block linear of a Llama", linear));
}

}  // namespace strata
