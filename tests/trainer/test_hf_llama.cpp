// The HF Llama adapter: key names and shapes of docs/formats.md, a bit-exact round trip,
// the q/k permutation checked numerically (HF's rotate-half RoPE on permuted weights gives the
// attention scores of Strata's interleaved RoPE), tied embeddings, config.json fields,
// and the configs Strata refuses with the reason.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <functional>
#include <set>

#include "checkpoint/hf_export.h"
#include "trainer/model/hf_llama.h"
#include "checkpoint/safetensors.h"
#include "tests/common/micro_model.h"
#include "trainer/model/hf_io.h"
#include "trainer/model/llama.h"

namespace strata {
namespace {

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

StateDict initialised(const ModelConfig& c) {
  Llama model(c);
  model.materialize(at::kCPU);
  model.initialize(17);
  StateDict copy;
  for (const auto& [fqn, t] : model.parameters()) copy.insert(fqn, t.detach().clone());
  return copy;
}

TEST(HfLlama, NamesAndShapesFollowLlamaForCausalLM) {
  for (bool tied : {false, true}) {
    const ModelConfig c = testing::micro_model(97, 16, tied);
    const LlamaStateDictAdapter adapter(c);
    const StateDict hf = adapter.to_hf(initialised(c));
    const int64_t H = c.dim, I = c.ffn_hidden_dim(), V = c.vocab_size, d = c.head_dim();
    const std::vector<std::pair<std::string, std::vector<int64_t>>> expected_layer = {
        {"self_attn.q_proj.weight", {c.n_heads * d, H}},
        {"self_attn.k_proj.weight", {c.n_kv_heads * d, H}},
        {"self_attn.v_proj.weight", {c.n_kv_heads * d, H}},
        {"self_attn.o_proj.weight", {H, c.n_heads * d}},
        {"mlp.gate_proj.weight", {I, H}},
        {"mlp.up_proj.weight", {I, H}},
        {"mlp.down_proj.weight", {H, I}},
        {"input_layernorm.weight", {H}},
        {"post_attention_layernorm.weight", {H}}};
    std::set<std::string> want = {"model.embed_tokens.weight", "model.norm.weight"};
    if (!tied) want.insert("lm_head.weight");
    for (int64_t i = 0; i < c.n_layers; ++i) {
      for (const auto& [name, shape] : expected_layer) {
        const std::string key = "model.layers." + std::to_string(i) + "." + name;
        want.insert(key);
        ASSERT_TRUE(hf.contains(key)) << key;
        EXPECT_EQ(hf.at(key).sizes().vec(), shape) << key;
      }
    }
    std::set<std::string> got;
    for (const auto& [key, t] : hf) got.insert(key);
    EXPECT_EQ(got, want);
    EXPECT_EQ(hf.at("model.embed_tokens.weight").sizes().vec(), (std::vector<int64_t>{V, H}));
    EXPECT_EQ(hf.keys().front(), "model.embed_tokens.weight");
  }
}

TEST(HfLlama, RoundTripIsBitIdenticalAndOnlyQAndKMove) {
  const ModelConfig c = testing::micro_model(97, 16);
  const LlamaStateDictAdapter adapter(c);
  const StateDict sd = initialised(c);
  const StateDict hf = adapter.to_hf(sd);
  const StateDict back = adapter.from_hf(hf);
  ASSERT_EQ(back.keys(), sd.keys());
  for (const auto& [fqn, t] : sd) {
    EXPECT_TRUE(at::equal(back.at(fqn), t)) << fqn;
    const bool moved =
        fqn.find(".wq.") != std::string::npos || fqn.find(".wk.") != std::string::npos;
    EXPECT_EQ(!at::equal(hf.at(adapter.hf_key(fqn)), t), moved) << fqn;
  }
  // Row r of each HF head comes from interleaved row 2r (first half) or 2(r - d/2) + 1.
  const at::Tensor wq = sd.at("layers.0.attention.wq.weight");
  const at::Tensor q = hf.at("model.layers.0.self_attn.q_proj.weight");
  const int64_t d = c.head_dim();
  for (int64_t h = 0; h < c.n_heads; ++h) {
    for (int64_t r = 0; r < d; ++r) {
      const int64_t source = h * d + (r < d / 2 ? 2 * r : 2 * (r - d / 2) + 1);
      EXPECT_TRUE(at::equal(q[h * d + r], wq[source]));
    }
  }
}

// HF's rotate-half RoPE on (B, T, heads, d).
at::Tensor rope_rotate_half(const at::Tensor& x, int64_t d, double theta) {
  const int64_t T = x.size(1);
  at::Tensor inv = at::pow(theta, -at::arange(0, d, 2, at::kDouble) / static_cast<double>(d));
  at::Tensor angles = at::outer(at::arange(T, at::kDouble), inv);  // (T, d/2)
  at::Tensor cos = at::cat({angles.cos(), angles.cos()}, -1).to(at::kFloat).view({1, T, 1, d});
  at::Tensor sin = at::cat({angles.sin(), angles.sin()}, -1).to(at::kFloat).view({1, T, 1, d});
  at::Tensor rotated = at::cat({-x.narrow(-1, d / 2, d / 2), x.narrow(-1, 0, d / 2)}, -1);
  return x * cos + rotated * sin;
}

TEST(HfLlama, PermutedWeightsUnderRotateHalfGiveTheSameAttentionScores) {
  const ModelConfig c = testing::micro_model(97, 16);
  const LlamaStateDictAdapter adapter(c);
  const StateDict sd = initialised(c);
  const int64_t T = 9, d = c.head_dim();
  at::manual_seed(5);
  const at::Tensor x = at::randn({1, T, c.dim});
  const auto [cos, sin] = rope_tables(d, c.max_seq_len, c.rope_theta);
  for (const char* which : {"wq", "wk"}) {
    const std::string fqn = std::string("layers.1.attention.") + which + ".weight";
    const at::Tensor w = sd.at(fqn);
    const int64_t heads = w.size(0) / d;
    const at::Tensor ours = apply_rope(at::matmul(x, w.t()).view({1, T, heads, d}), cos, sin);
    const at::Tensor theirs = rope_rotate_half(
        at::matmul(x, adapter.to_hf(fqn, w).t()).view({1, T, heads, d}), d, c.rope_theta);
    // Scores q_t . q_s per head: invariant under the same permutation of both vectors.
    const at::Tensor a = at::einsum("bthd,bshd->bhts", {ours, ours});
    const at::Tensor b = at::einsum("bthd,bshd->bhts", {theirs, theirs});
    EXPECT_TRUE(at::allclose(a, b, 1e-5, 1e-5))
        << which << " max diff " << (a - b).abs().max().item<float>();
  }
}

TEST(HfLlama, TiedSourcesUnexpectedKeysAndBuffers) {
  const ModelConfig untied = testing::micro_model(97, 16, false);
  const ModelConfig tied = testing::micro_model(97, 16, true);
  StateDict hf = LlamaStateDictAdapter(tied).to_hf(initialised(tied));
  hf.insert("model.layers.0.self_attn.rotary_emb.inv_freq", at::ones({4}));
  const StateDict loaded = LlamaStateDictAdapter(untied).from_hf(hf);
  ASSERT_TRUE(loaded.contains("output.weight"));  // copied from the tied embedding
  EXPECT_TRUE(at::equal(loaded.at("output.weight"), loaded.at("tok_embeddings.weight")));
  EXPECT_FALSE(loaded.contains("layers.0.attention.rotary_emb.inv_freq"));
  hf.insert("model.layers.0.self_attn.q_proj.bias", at::zeros({32}));
  try {
    LlamaStateDictAdapter(untied).from_hf(hf);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_HAS(e.what(), "unexpected keys for a Llama: model.layers.0.self_attn.q_proj.bias");
  }
  EXPECT_THROW(LlamaStateDictAdapter(untied).hf_key("layers.0.attention.wz.weight"),
               CheckpointError);
}

TEST(HfLlama, ConfigJsonHasTheFieldsOfBothTransformersLines) {
  ModelConfig c = testing::micro_model(97, 16);
  c.rope_theta = 10000.0;
  c.norm_eps = 1e-5;
  const LlamaStateDictAdapter adapter(c);
  const nlohmann::ordered_json j = adapter.config_json("bfloat16", 1, 2);
  const std::string text = j.dump();
  EXPECT_EQ(j["architectures"].dump(), "[\"LlamaForCausalLM\"]");
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["intermediate_size"], c.ffn_hidden_dim());
  EXPECT_EQ(j["num_key_value_heads"], c.n_kv_heads);
  EXPECT_EQ(j["head_dim"], c.head_dim());
  EXPECT_EQ(j["tie_word_embeddings"], false);
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
  EXPECT_EQ(j["dtype"], "bfloat16");
  EXPECT_TRUE(j["rope_scaling"].is_null());
  EXPECT_TRUE(j["pad_token_id"].is_null());
  // Floats are written as floats (transformers v5 rejects an integer in a float field).
  EXPECT_HAS(text, "\"rope_theta\":10000.0");
  EXPECT_HAS(text, "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":10000.0}");
  EXPECT_HAS(text, "\"rms_norm_eps\":1e-05");
  EXPECT_HAS(text, "\"attention_dropout\":0.0");
  EXPECT_EQ(text.find("\"architectures\""), 1u);  // field order as docs/formats.md gives it
  const ModelConfig back =
      LlamaStateDictAdapter::model_config_from_hf(nlohmann::json::parse(text), "config.json");
  EXPECT_EQ(back.ffn_hidden_dim(), c.ffn_hidden_dim());
  EXPECT_TRUE(LlamaStateDictAdapter::differences(c, back).empty());
  EXPECT_EQ(back.n_kv_heads, c.n_kv_heads);
  EXPECT_EQ(back.rope_theta, c.rope_theta);
  EXPECT_EQ(back.norm_eps, c.norm_eps);
  const auto g = LlamaStateDictAdapter::generation_config_json(1, 2);
  EXPECT_EQ(g["bos_token_id"], 1);
  EXPECT_EQ(g["_from_model_config"], true);
}

TEST(HfLlama, UnsupportedConfigsAreRefusedWithTheReason) {
  const LlamaStateDictAdapter adapter(testing::micro_model(97, 16));
  const nlohmann::json good = nlohmann::json::parse(adapter.config_json("float32", 1, 2).dump());
  auto error_for = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json c = good;
    edit(c);
    try {
      LlamaStateDictAdapter::model_config_from_hf(c, "x/config.json");
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_HAS(error_for([](auto& c) { c["model_type"] = "mistral"; }),
             "x/config.json: model_type is 'mistral'");
  EXPECT_HAS(error_for([](auto& c) {
               c["rope_scaling"] = {{"rope_type", "llama3"}};
             }),
             "rope_scaling.rope_type 'llama3' is not supported");
  EXPECT_HAS(error_for([](auto& c) { c["attention_bias"] = true; }),
             "attention_bias is true: biases are not supported");
  EXPECT_HAS(error_for([](auto& c) { c["mlp_bias"] = true; }),
             "mlp_bias is true: biases are not supported");
  // Found by transformers' own files: each of these used to load silently as a plain Llama.
  // A legacy "type" key is the RoPE type (transformers reads it so).
  EXPECT_HAS(error_for([](auto& c) {
               c["rope_parameters"] = {{"type", "linear"}, {"factor", 2.0}};
             }),
             "rope_parameters.rope_type 'linear' is not supported");
  EXPECT_HAS(error_for([](auto& c) { c["hidden_act"] = "gelu"; }),
             "hidden_act 'gelu' is not supported");
  // rope_scaling, when set, wins over rope_parameters (as in transformers).
  EXPECT_HAS(error_for([](auto& c) {
               c["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
               c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
             }),
             "rope_scaling.rope_type 'dynamic' is not supported");
  EXPECT_HAS(error_for([](auto& c) { c["head_dim"] = 64; }), "head_dim 64 differs");
  EXPECT_HAS(error_for([](auto& c) { c.erase("hidden_size"); }), "invalid or missing field");
  EXPECT_HAS(error_for([](auto& c) { c["num_key_value_heads"] = 3; }),
             "not a multiple of num_key_value_heads");
}

TEST(HfLlama, ConfigFieldsAreReadAsTransformersReadsThem) {
  const LlamaStateDictAdapter adapter(testing::micro_model(97, 16));
  const nlohmann::json good = nlohmann::json::parse(adapter.config_json("float32", 1, 2).dump());
  // transformers v5 writes rope_theta only inside rope_parameters, which wins over the top level.
  nlohmann::json c = good;
  c.erase("rope_theta");
  c.erase("rope_scaling");
  c["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "default"}};
  EXPECT_EQ(LlamaStateDictAdapter::model_config_from_hf(c, "config.json").rope_theta, 500000.0);
  c["rope_theta"] = 10000.0;
  EXPECT_EQ(LlamaStateDictAdapter::model_config_from_hf(c, "config.json").rope_theta, 500000.0);
  // A default-type rope_scaling (which then replaces rope_parameters: its theta is the top-level
  // one), "swish" (the same function as silu), and null fields (their defaults) are plain Llama.
  c["rope_scaling"] = {{"type", "default"}};
  c["hidden_act"] = "swish";
  c["num_key_value_heads"] = nullptr;
  c["head_dim"] = nullptr;
  const ModelConfig s = LlamaStateDictAdapter::model_config_from_hf(c, "config.json");
  EXPECT_EQ(s.rope_theta, 10000.0);
  EXPECT_EQ(s.n_kv_heads, s.n_heads);
}

TEST(HfLlama, SizeFieldsArePositiveWholeNumbers) {
  const LlamaStateDictAdapter adapter(testing::micro_model(97, 16));
  const nlohmann::json good = nlohmann::json::parse(adapter.config_json("float32", 1, 2).dump());
  auto error_for = [&](const char* key, const nlohmann::json& value) {
    nlohmann::json c = good;
    c[key] = value;
    try {
      LlamaStateDictAdapter::model_config_from_hf(c, "x/config.json");
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_HAS(error_for("vocab_size", 512.5),
             "x/config.json: vocab_size is 512.5, not a whole number");
  EXPECT_HAS(error_for("vocab_size", 512.5), "HINT: correct vocab_size in x/config.json");
  EXPECT_HAS(error_for("num_hidden_layers", -4), "num_hidden_layers is -4, not a positive size");
  EXPECT_HAS(error_for("hidden_size", 0), "hidden_size is 0, not a positive size");
  EXPECT_HAS(error_for("num_attention_heads", "4"), "num_attention_heads is \"4\", not a number");
  EXPECT_HAS(error_for("intermediate_size", true), "intermediate_size is true, not a number");
  EXPECT_HAS(error_for("num_key_value_heads", 1.5), "num_key_value_heads is 1.5, not a whole");
  EXPECT_HAS(error_for("head_dim", -8), "head_dim is -8, not a positive size");
  EXPECT_HAS(error_for("max_position_embeddings", 1e12),
             "max_position_embeddings is 1000000000000.0, more than 2147483648 (2^31)");
  EXPECT_HAS(error_for("vocab_size", 1000000000000), "vocab_size is 1000000000000, more than");
  // A whole number written as a float is that number (as Python's int(1e9) is); the memory
  // check, not the parser, judges whether it fits.
  nlohmann::json c = good;
  c["num_hidden_layers"] = 1e9;
  c["vocab_size"] = 97.0;
  const ModelConfig m = LlamaStateDictAdapter::model_config_from_hf(c, "x/config.json");
  EXPECT_EQ(m.n_layers, 1000000000);
  EXPECT_EQ(m.vocab_size, 97);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

TEST(HfShards, PlanFillsShardsInOrderAndKeepsBigTensorsAlone) {
  const std::vector<HfTensorSpec> specs = {{"a", {10}, at::kFloat},     // 40 bytes
                                           {"b", {5}, at::kFloat},      // 20
                                           {"c", {100}, at::kFloat},    // 400: over the limit
                                           {"d", {2}, at::kBFloat16}};  // 4
  const HfShardPlan plan = plan_hf_shards(specs, 64);
  EXPECT_EQ(plan.files, (std::vector<std::string>{"model-00001-of-00003.safetensors",
                                                  "model-00002-of-00003.safetensors",
                                                  "model-00003-of-00003.safetensors"}));
  EXPECT_EQ(plan.file_of.at("a"), 0u);
  EXPECT_EQ(plan.file_of.at("b"), 0u);
  EXPECT_EQ(plan.file_of.at("c"), 1u);
  EXPECT_EQ(plan.file_of.at("d"), 2u);
  EXPECT_EQ(plan.total_size, 464u);
  EXPECT_EQ(plan.owner(2, 2), 0);
  const HfShardPlan same = plan_from_weight_map({{"a", "x.safetensors"},
                                                 {"b", "y.safetensors"},
                                                 {"c", "x.safetensors"},
                                                 {"d", "y.safetensors"}},
                                                specs);
  EXPECT_EQ(same.files, (std::vector<std::string>{"x.safetensors", "y.safetensors"}));
  EXPECT_EQ(same.file_of.at("c"), 0u);
  EXPECT_EQ(same.total_size, 464u);
  EXPECT_THROW(plan_from_weight_map({{"a", "x.safetensors"}}, specs), CheckpointError);
}

TEST(HfShards, ByteSizesUseDecimalUnits) {
  EXPECT_EQ(parse_byte_size("5GB"), 5'000'000'000u);
  EXPECT_EQ(parse_byte_size("500MB"), 500'000'000u);
  EXPECT_EQ(parse_byte_size("1.5kb"), 1500u);
  EXPECT_EQ(parse_byte_size("4096"), 4096u);
  EXPECT_THROW(parse_byte_size("5XB"), std::invalid_argument);
  EXPECT_THROW(parse_byte_size("GB"), std::invalid_argument);
  EXPECT_THROW(parse_byte_size("0"), std::invalid_argument);
}

}  // namespace
}  // namespace strata
