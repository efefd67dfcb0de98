// Llama model: parameter count, shapes, causality, RoPE, init contract.
#include <gtest/gtest.h>

#include <set>

#include "tests/common/micro_model.h"
#include "trainer/kernels/fused_ops.h"
#include "trainer/model/llama.h"

namespace strata {
namespace {

// Vocabulary 97: a size no power of two hides.
ModelConfig micro_config_for_llama() {
  return testing::micro_model(97, 16);
}

Llama initialised_model(const ModelConfig& c, uint64_t seed = 7) {
  Llama model(c);
  model.materialize(at::kCPU);
  model.initialize(seed);
  return model;
}

TEST(Llama, ParameterCountFormulaMatchesTensors) {
  for (bool tied : {false, true}) {
    for (int64_t kv : {1, 2, 4}) {
      ModelConfig c = micro_config_for_llama();
      c.tie_embeddings = tied;
      c.n_kv_heads = kv;
      c.ffn_dim_multiplier = kv == 1 ? std::optional<double>(1.3) : std::nullopt;
      Llama model(c);
      EXPECT_EQ(model.num_parameters(), Llama::count_parameters(c))
          << "tied " << tied << " kv " << kv;
    }
  }
  // Llama-2 7B: 6.74B parameters.
  ModelConfig llama2;
  llama2.vocab_size = 32000;
  llama2.dim = 4096;
  llama2.n_layers = 32;
  llama2.n_heads = 32;
  llama2.n_kv_heads = 32;
  llama2.multiple_of = 256;
  EXPECT_EQ(Llama::count_parameters(llama2), 6738415616);
}

TEST(Llama, BuiltOnMetaDeviceUntilMaterialised) {
  Llama model(micro_config_for_llama());
  for (const auto& [fqn, t] : model.parameters()) EXPECT_TRUE(t.device().is_meta()) << fqn;
  model.materialize(at::kCPU);
  for (const auto& [fqn, t] : model.parameters()) {
    EXPECT_TRUE(t.device().is_cpu()) << fqn;
    EXPECT_TRUE(t.requires_grad()) << fqn;
  }
}

TEST(Llama, ParameterNamesFollowTheInternalConvention) {
  ModelConfig c = micro_config_for_llama();
  std::vector<std::string> keys = Llama(c).parameters().keys();
  ASSERT_EQ(keys.size(), 1u + 9u * 2u + 2u);
  EXPECT_EQ(keys.front(), "tok_embeddings.weight");
  EXPECT_EQ(keys[1], "layers.0.attention_norm.weight");
  EXPECT_EQ(keys[2], "layers.0.attention.wq.weight");
  EXPECT_EQ(keys[7], "layers.0.feed_forward.w1.weight");
  EXPECT_EQ(keys[keys.size() - 2], "norm.weight");
  EXPECT_EQ(keys.back(), "output.weight");
  c.tie_embeddings = true;
  EXPECT_FALSE(Llama(c).parameters().contains("output.weight"));
}

TEST(Llama, ForwardGivesLogitsPerPosition) {
  Llama model = initialised_model(micro_config_for_llama());
  at::Tensor tokens = at::randint(0, 97, {3, 11}, at::kLong);
  at::Tensor logits = model.forward(tokens);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{3, 11, 97}));
  EXPECT_EQ(logits.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::isfinite(logits).all().item<bool>());
}

TEST(Llama, ChangingAFutureTokenLeavesEarlierLogitsUnchanged) {
  Llama model = initialised_model(micro_config_for_llama());
  at::NoGradGuard no_grad;
  at::Tensor tokens = at::randint(0, 97, {2, 12}, at::kLong);
  at::Tensor before = model.forward(tokens);
  for (int64_t t : {0, 5, 10}) {
    at::Tensor changed = tokens.clone();
    changed.select(1, t + 1).add_(1).remainder_(97);
    at::Tensor after = model.forward(changed);
    EXPECT_TRUE(at::allclose(before.narrow(1, 0, t + 1), after.narrow(1, 0, t + 1), 0, 1e-6))
        << "position " << t;
    EXPECT_FALSE(at::allclose(before.narrow(1, t + 1, 1), after.narrow(1, t + 1, 1)))
        << "position " << t + 1 << " should see its own token";
  }
}

// Documents packed into one row with a document mask compute exactly what each computes alone
// (logits, and the gradients of a summed loss), with the fused kernels on and off; without the
// mask the later documents see the earlier ones.
TEST(Llama, PackedDocumentsWithADocumentMaskEqualTheDocumentsAlone) {
  const ModelConfig c = micro_config_for_llama();
  const std::vector<int64_t> lengths = {5, 7, 4};  // one row of 16
  at::manual_seed(11);
  const at::Tensor tokens = at::randint(0, c.vocab_size, {1, 16}, at::kLong);
  at::Tensor doc_start = at::zeros({1, 16}, at::kByte);
  int64_t start = 0;
  for (const int64_t n : lengths) {
    doc_start[0][start] = 1;
    start += n;
  }
  const DocumentMask documents = document_mask(doc_start);
  EXPECT_TRUE(at::equal(documents.positions[0],
                        at::tensor({0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3}, at::kLong)));
  EXPECT_EQ(documents.allowed.sizes(), (std::vector<int64_t>{1, 1, 16, 16}));
  for (const bool fused_kernels : {true, false}) {
    fused::set_enabled(fused_kernels);
    Llama packed = initialised_model(c), alone = initialised_model(c);
    const at::Tensor packed_logits = packed.forward(tokens, &documents);
    packed_logits.sum().backward();
    int64_t first = 0;
    for (const int64_t n : lengths) {
      const at::Tensor logits = alone.forward(tokens.narrow(1, first, n));
      logits.sum().backward();  // gradients accumulate over the documents
      EXPECT_TRUE(at::allclose(packed_logits.narrow(1, first, n), logits, 1e-5, 1e-5))
          << "document at " << first << ", fused " << fused_kernels;
      if (first > 0) {
        const at::Tensor causal = packed.forward(tokens).narrow(1, first, n);
        EXPECT_FALSE(at::allclose(causal, logits, 1e-3, 1e-3)) << "document at " << first;
      }
      first += n;
    }
    for (const auto& [fqn, p] : packed.parameters()) {
      const at::Tensor g = alone.parameters().at(fqn).grad();
      EXPECT_TRUE(at::allclose(p.grad(), g, 1e-4, 1e-5))
          << fqn << " max diff " << (p.grad() - g).abs().max().item<double>();
    }
  }
  fused::set_enabled(true);
}

TEST(Llama, RopeDotProductDependsOnlyOnRelativePosition) {
  const int64_t hd = 16, max_len = 64;
  auto [cos, sin] = rope_tables(hd, max_len, 10000.0);
  at::Tensor q = at::randn({hd}), k = at::randn({hd});
  // Place q at every position and k at every position of one sequence each.
  at::Tensor qs =
      apply_rope(q.expand({1, max_len, 1, hd}).contiguous(), cos, sin).view({max_len, hd});
  at::Tensor ks =
      apply_rope(k.expand({1, max_len, 1, hd}).contiguous(), cos, sin).view({max_len, hd});
  at::Tensor dots = at::matmul(qs.to(at::kDouble), ks.to(at::kDouble).t());  // (m, n)
  for (int64_t offset : {0, 3, 17}) {
    const double reference = dots[offset][0].item<double>();
    for (int64_t shift : {1, 9, 40}) {
      EXPECT_NEAR(dots[offset + shift][shift].item<double>(), reference, 1e-4)
          << "offset " << offset << " shift " << shift;
    }
  }
  // Position 0 is the identity; rotation preserves norms.
  EXPECT_TRUE(at::allclose(qs[0], q, 0, 1e-6));
  EXPECT_NEAR(qs[37].norm().item<double>(), q.norm().item<double>(), 1e-4);
}

TEST(Llama, InitialiseSkipsLoadedTensors) {
  ModelConfig c = micro_config_for_llama();
  Llama model(c);
  model.materialize(at::kCPU);
  const std::string loaded_key = "layers.1.attention.wk.weight";
  {
    at::NoGradGuard no_grad;
    model.parameters().at(loaded_key).fill_(7.0);
  }
  std::vector<std::string> initialised = model.initialize(3, {loaded_key});
  EXPECT_EQ(initialised.size(), model.parameters().size() - 1);
  EXPECT_EQ(std::count(initialised.begin(), initialised.end(), loaded_key), 0);
  EXPECT_TRUE(model.parameters().at(loaded_key).eq(7.0).all().item<bool>());
  EXPECT_TRUE(model.parameters().at("norm.weight").eq(1.0).all().item<bool>());
}

TEST(Llama, InitialWeightsDependOnlyOnSeedAndName) {
  ModelConfig c = micro_config_for_llama();
  Llama a = initialised_model(c, 11);
  Llama b(c);
  b.materialize(at::kCPU);
  b.initialize(11, {"tok_embeddings.weight", "layers.0.attention.wq.weight"});
  for (const auto& [fqn, t] : a.parameters()) {
    if (fqn == "tok_embeddings.weight" || fqn == "layers.0.attention.wq.weight") continue;
    EXPECT_TRUE(at::equal(t, b.parameters().at(fqn))) << fqn;
  }
  Llama other_seed = initialised_model(c, 12);
  EXPECT_FALSE(
      at::equal(a.parameters().at("output.weight"), other_seed.parameters().at("output.weight")));
}

TEST(Llama, InitialisationScalesFollowTheScheme) {
  ModelConfig c = micro_config_for_llama();
  c.vocab_size = 512;
  c.dim = 64;
  c.n_layers = 4;
  c.multiple_of = 64;
  Llama model = initialised_model(c);
  auto std_of = [&](const std::string& k) { return model.parameters().at(k).std().item<double>(); };
  EXPECT_NEAR(std_of("tok_embeddings.weight"), 1.0, 0.05);
  EXPECT_NEAR(std_of("layers.0.attention.wq.weight"), 0.02, 0.002);
  EXPECT_NEAR(std_of("layers.3.feed_forward.w2.weight"), 0.02 / std::sqrt(8.0), 0.001);
  const double out_std = 1.0 / std::sqrt(64.0);
  EXPECT_LE(model.parameters().at("output.weight").abs().max().item<double>(), 3 * out_std + 1e-6);
}

TEST(Llama, TiedEmbeddingsShareTheOutputProjection) {
  ModelConfig c = micro_config_for_llama();
  c.tie_embeddings = true;
  Llama model = initialised_model(c);
  at::Tensor tokens = at::randint(0, 97, {1, 5}, at::kLong);
  at::Tensor loss = model.forward(tokens).sum();
  loss.backward();
  // The embedding gets gradient from both the lookup and the output projection: every row.
  at::Tensor grad = model.parameters().at("tok_embeddings.weight").grad();
  EXPECT_GT(grad.abs().sum(1).gt(0).sum().item<int64_t>(), 5);
}

TEST(Llama, TrainingFlopsCountMatmulsAndAttention) {
  ModelConfig c = micro_config_for_llama();
  const double matmul_params = Llama::count_parameters(c) - c.vocab_size * c.dim;
  EXPECT_DOUBLE_EQ(Llama::training_flops_per_token(c, 16),
                   6 * matmul_params + 12.0 * c.n_layers * c.n_heads * c.head_dim() * 16);
}

}  // namespace
}  // namespace strata
