// Model converters on the whole model: LoRA (B = 0 is the base model exactly, training moves
// only A/B, the merged export is W + (alpha/r)·B·A, PEFT keys, shapes and adapter_config as
// docs/formats.md) and int8 QAT (per-channel fake quantisation, straight-through gradient,
// the export transform), plus the protocol's composition.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/common/micro_model.h"
#include "trainer/model/converters/converter.h"
#include "trainer/model/llama.h"
#include "trainer/optim/adamw.h"

namespace strata {
namespace {

ConverterConfig lora_config(std::vector<std::string> targets = {"wq", "wk", "wv", "wo", "w1", "w2",
                                                                "w3"}) {
  ConverterConfig c;
  c.type = "lora";
  c.rank = 4;
  c.alpha = 8;
  c.target_modules = std::move(targets);
  return c;
}

bool is_lora(const std::string& fqn) {
  return fqn.find(".lora_a") != std::string::npos || fqn.find(".lora_b") != std::string::npos;
}

TEST(LoraConverter, AddsFactorsInitialisesThemAndWithBZeroIsTheBaseModelExactly) {
  const ModelConfig c = testing::micro_model(67, 16);
  Llama base(c);
  base.materialize(at::kCPU);
  base.initialize(3);
  const Converters converters({lora_config()});
  Llama lora(c, &converters);
  lora.materialize(at::kCPU);
  std::set<std::string> loaded;
  {
    at::NoGradGuard no_grad;
    for (const auto& [fqn, p] : base.parameters()) {
      lora.parameters().at(fqn).copy_(p);
      loaded.insert(fqn);
    }
  }
  const std::vector<std::string> initialised = lora.initialize(3, loaded);
  EXPECT_EQ(initialised.size(), 2u * 7u * 2u);  // A and B of 7 linears in 2 layers
  const StateDict p = lora.parameters();
  EXPECT_EQ(p.at("layers.1.attention.wq.lora_a").sizes(), (at::IntArrayRef{4, 32}));
  EXPECT_EQ(p.at("layers.1.attention.wq.lora_b").sizes(), (at::IntArrayRef{32, 4}));
  EXPECT_EQ(p.at("layers.0.feed_forward.w2.lora_a").sizes(),
            (at::IntArrayRef{4, c.ffn_hidden_dim()}));
  EXPECT_TRUE(at::equal(p.at("layers.0.attention.wk.lora_b"), at::zeros({16, 4})));
  const double bound = 1.0 / std::sqrt(32.0);  // kaiming_uniform(a=sqrt(5)) on fan_in 32
  EXPECT_LE(p.at("layers.0.attention.wk.lora_a").abs().max().item<double>(), bound);
  EXPECT_GT(p.at("layers.0.attention.wk.lora_a").abs().max().item<double>(), 0.5 * bound);
  for (const auto& [fqn, t] : p) EXPECT_EQ(t.requires_grad(), is_lora(fqn)) << fqn;

  at::NoGradGuard no_grad;
  at::manual_seed(1);
  const at::Tensor tokens = at::randint(0, c.vocab_size, {2, 9}, at::kLong);
  EXPECT_TRUE(at::equal(lora.forward(tokens), base.forward(tokens)));
}

TEST(LoraConverter, TrainingMovesOnlyTheAdaptersAndTheMergeEqualsTheForward) {
  const ModelConfig c = testing::micro_model(67, 16);
  ConverterConfig cc = lora_config({"wq", "wv", "w3"});
  cc.export_mode = "merged";
  const Converters converters({cc});
  Llama lora(c, &converters);
  lora.materialize(at::kCPU);
  lora.initialize(4);
  StateDict before;
  for (const auto& [fqn, t] : lora.parameters()) before.insert(fqn, t.detach().clone());
  OptimizerConfig oc;
  oc.lr = 1e-2;
  AdamW optimizer(oc);
  for (const auto& [fqn, t] : lora.parameters()) {
    if (lora.trainable(fqn)) optimizer.add_parameter(fqn, t, uses_weight_decay(fqn, t.dim()));
  }
  for (int step = 0; step < 3; ++step) {
    at::manual_seed(step);
    const at::Tensor tokens = at::randint(0, c.vocab_size, {4, 11}, at::kLong);
    at::cross_entropy_loss(lora.forward(tokens.narrow(1, 0, 10)).flatten(0, 1),
                           tokens.narrow(1, 1, 10).flatten())
        .backward();
    optimizer.step(oc.lr);
    optimizer.zero_grad();
  }
  for (const auto& [fqn, t] : lora.parameters()) {
    if (is_lora(fqn)) {
      EXPECT_FALSE(at::equal(t, before.at(fqn))) << fqn << " did not move";
    } else {
      EXPECT_TRUE(at::equal(t, before.at(fqn))) << fqn << " moved";
      EXPECT_FALSE(t.grad().defined()) << fqn << " has a gradient";
    }
  }

  // Views: base drops the adapters; export (merged) folds scale·B·A into the weights.
  const StateDict full = lora.parameters();
  const StateDict base = converters.base_view(full);
  const StateDict exported = converters.export_view(full);
  EXPECT_EQ(base.size(), full.size() - 2 * 3 * 2);
  EXPECT_EQ(exported.keys(), base.keys());
  const double scale = 8.0 / 4.0;
  for (const auto& [fqn, t] : exported) {
    const std::string prefix = fqn.substr(0, fqn.size() - 7);  // without ".weight"
    if (full.contains(prefix + ".lora_a")) {
      const at::Tensor expected =
          full.at(fqn) + scale * at::mm(full.at(prefix + ".lora_b"), full.at(prefix + ".lora_a"));
      EXPECT_TRUE(at::allclose(t, expected, 0, 1e-7)) << fqn;
      EXPECT_FALSE(at::equal(t, full.at(fqn))) << fqn;
    } else {
      EXPECT_TRUE(at::equal(t, full.at(fqn))) << fqn;
    }
  }
  // The merged weights in a plain model compute what the adapters did (fp32 rounding).
  Llama merged(c);
  merged.materialize(at::kCPU);
  {
    at::NoGradGuard no_grad;
    for (const auto& [fqn, t] : exported) merged.parameters().at(fqn).copy_(t);
  }
  const std::vector<std::string> keys = exported.keys();
  merged.initialize(0, std::set<std::string>(keys.begin(), keys.end()));
  at::NoGradGuard no_grad;
  const at::Tensor tokens = at::randint(0, c.vocab_size, {2, 9}, at::kLong);
  const at::Tensor a = merged.forward(tokens), b = lora.forward(tokens);
  EXPECT_TRUE(at::allclose(a, b, 1e-5, 1e-5)) << (a - b).abs().max().item<double>();
}

TEST(LoraConverter, RsloraScalesByTheSquareRootOfTheRank) {
  ConverterConfig cc = lora_config({"wq"});
  cc.use_rslora = true;
  cc.rank = 16;
  cc.export_mode = "merged";
  const Converters converters({cc});
  StateDict sd;
  sd.insert("layers.0.attention.wq.weight", at::zeros({8, 6}));
  sd.insert("layers.0.attention.wq.lora_a", at::ones({16, 6}));
  sd.insert("layers.0.attention.wq.lora_b", at::ones({8, 16}));
  const at::Tensor merged = converters.export_view(sd).at("layers.0.attention.wq.weight");
  EXPECT_TRUE(
      at::allclose(merged, at::full({8, 6}, 16.0 * 8.0 / 4.0)));  // 16 terms x alpha / sqrt(16)
}

TEST(LoraConverter, PeftKeysAndAdapterConfigFollowHfFormats) {
  ConverterConfig cc = lora_config({"wq", "wk", "wv", "wo", "w1", "w2", "w3"});
  cc.dropout = 0.05;
  const Converters converters({cc});
  const ConverterAdapter* adapter = converters.list().at(0)->state_dict_adapter();
  ASSERT_NE(adapter, nullptr);
  EXPECT_EQ(adapter->weights_file(), "adapter_model.safetensors");
  EXPECT_EQ(adapter->config_file(), "adapter_config.json");
  const std::vector<std::pair<std::string, std::string>> keys = {
      {"layers.3.attention.wq.lora_a",
       "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"},
      {"layers.3.attention.wk.lora_b",
       "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight"},
      {"layers.0.attention.wv.lora_a",
       "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"},
      {"layers.0.attention.wo.lora_b",
       "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"},
      {"layers.12.feed_forward.w1.lora_a",
       "base_model.model.model.layers.12.mlp.gate_proj.lora_A.weight"},
      {"layers.12.feed_forward.w2.lora_b",
       "base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"},
      {"layers.12.feed_forward.w3.lora_a",
       "base_model.model.model.layers.12.mlp.up_proj.lora_A.weight"}};
  for (const auto& [fqn, key] : keys) {
    EXPECT_EQ(adapter->to_file_key(fqn), key);
    EXPECT_EQ(adapter->from_file_key(key), fqn);
  }
  // Other spellings loaders accept: without the PeftModel prefix, with the adapter name.
  EXPECT_EQ(adapter->from_file_key("model.layers.2.self_attn.q_proj.lora_A.weight"),
            "layers.2.attention.wq.lora_a");
  EXPECT_EQ(
      adapter->from_file_key("base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight"),
      "layers.2.feed_forward.w3.lora_b");
  EXPECT_FALSE(adapter->from_file_key("base_model.model.lm_head.lora_A.weight").has_value());

  const nlohmann::json config = adapter->config_json("/models/base");
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["base_model_name_or_path"], "/models/base");
  EXPECT_EQ(config["r"], 4);
  EXPECT_TRUE(config["r"].is_number_integer());
  EXPECT_EQ(config["lora_alpha"], 8.0);
  EXPECT_EQ(config["lora_dropout"], 0.05);
  EXPECT_EQ(config["target_modules"], (nlohmann::json{"down_proj", "gate_proj", "k_proj", "o_proj",
                                                      "q_proj", "up_proj", "v_proj"}));
  EXPECT_EQ(config["bias"], "none");
  EXPECT_EQ(config["fan_in_fan_out"], false);
  EXPECT_EQ(config["use_rslora"], false);
  EXPECT_EQ(config["use_dora"], false);
  EXPECT_TRUE(config["modules_to_save"].is_null());
  EXPECT_EQ(config["rank_pattern"], nlohmann::json::object());
}

TEST(Int8Qat, FakeQuantisesPerOutputChannelWithAStraightThroughGradient) {
  ConverterConfig cc;
  cc.type = "int8_qat";
  cc.target_modules = {"w1"};
  const Converters converters({cc});
  at::manual_seed(0);
  at::Tensor w = at::randn({6, 5}).requires_grad_(true);
  at::Tensor x = at::randn({3, 5});
  at::Tensor y = converters.linear("w1", x, w, {});
  // Expected: each row scaled by max|row| / 127, rounded, clamped to [-127, 127].
  const at::Tensor scale = w.detach().abs().amax({1}, true) / 127.0;
  const at::Tensor wq = at::clamp(at::round(w.detach() / scale), -127, 127) * scale;
  EXPECT_TRUE(at::allclose(y, at::linear(x, wq), 1e-6, 1e-6));
  EXPECT_LE((wq - w.detach()).abs().max().item<double>(), scale.max().item<double>() / 2 + 1e-7);
  EXPECT_EQ(std::get<0>(at::_unique(at::round(w.detach() / scale).flatten())).numel() > 1, true);
  // Straight-through: dy/dw is what an unquantised linear gives.
  y.sum().backward();
  EXPECT_TRUE(at::allclose(w.grad(), x.sum(0).expand({6, 5}), 1e-6, 1e-6));
  // Untargeted linears are untouched.
  EXPECT_TRUE(at::equal(converters.linear("wq", x, w.detach(), {}), at::linear(x, w.detach())));

  // The export transform writes the quantise-dequantised weights; applying it again changes
  // nothing (the round trip is stable), and untargeted keys pass through.
  StateDict sd;
  sd.insert("layers.0.feed_forward.w1.weight", w.detach());
  sd.insert("layers.0.attention.wq.weight", w.detach());
  const StateDict once = converters.export_view(sd);
  EXPECT_TRUE(at::allclose(once.at("layers.0.feed_forward.w1.weight"), wq, 0, 1e-7));
  EXPECT_TRUE(at::equal(once.at("layers.0.attention.wq.weight"), w.detach()));
  const StateDict twice = converters.export_view(once);
  EXPECT_TRUE(at::allclose(twice.at("layers.0.feed_forward.w1.weight"), wq, 0, 1e-6));
  EXPECT_FALSE(converters.owned("layers.0.feed_forward.w1.weight"));
}

TEST(Converters, ComposeFiltersAndApplyTransformsInReverseOrder) {
  ConverterConfig lora = lora_config({"w1"});
  lora.export_mode = "merged";
  ConverterConfig qat;
  qat.type = "int8_qat";
  qat.target_modules = {"w1"};
  const Converters converters({lora, qat});  // applied: LoRA, then QAT
  EXPECT_TRUE(converters.owned("layers.0.feed_forward.w1.lora_a"));
  EXPECT_FALSE(converters.owned("layers.0.feed_forward.w1.weight"));
  EXPECT_FALSE(converters.trainable("layers.0.feed_forward.w1.weight"));  // LoRA freezes the base
  at::manual_seed(2);
  StateDict sd;
  sd.insert("layers.0.feed_forward.w1.weight", at::randn({6, 5}));
  sd.insert("layers.0.feed_forward.w1.lora_a", at::randn({4, 5}));
  sd.insert("layers.0.feed_forward.w1.lora_b", at::randn({6, 4}));
  // Reverse order: QAT's transform first (the base weight as forward quantises it), then the
  // merge adds the adapter, exactly what forward computes.
  const at::Tensor w = sd.at("layers.0.feed_forward.w1.weight");
  const at::Tensor scale = w.abs().amax({1}, true) / 127.0;
  const at::Tensor expected = at::clamp(at::round(w / scale), -127, 127) * scale +
                              2.0 * at::mm(sd.at("layers.0.feed_forward.w1.lora_b"),
                                           sd.at("layers.0.feed_forward.w1.lora_a"));
  const StateDict exported = converters.export_view(sd);
  ASSERT_EQ(exported.size(), 1u);
  EXPECT_TRUE(at::allclose(exported.at("layers.0.feed_forward.w1.weight"), expected, 1e-6, 1e-6));
  const at::Tensor x = at::randn({3, 5});
  EXPECT_TRUE(at::allclose(
      converters.linear(
          "w1", x, w,
          {sd.at("layers.0.feed_forward.w1.lora_a"), sd.at("layers.0.feed_forward.w1.lora_b")}),
      at::linear(x, exported.at("layers.0.feed_forward.w1.weight")), 1e-5, 1e-5));
}

}  // namespace
}  // namespace strata
