// The fused kernels against the ATen composition in fp64: outputs and every input gradient,
// shapes that cross the 64-row blocks, GQA, frozen weights, bad targets, thread-count
// independence.
#include "trainer/kernels/fused_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace strata {
namespace {

// Normwise relative error: the largest |a - b| over the largest |b|.
double max_error(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor b64 = b.to(at::kDouble);
  return (a.to(at::kDouble) - b64).abs().max().item<double>() / b64.abs().max().item<double>();
}

// Runs fn on fp32 leaves (fused) and on fp64 copies (reference) with the same upstream
// gradient; compares the outputs and the gradients of the leaves that require them.
void expect_matches(const std::vector<at::Tensor>& inputs, const std::vector<bool>& requires_grad,
                    const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fused,
                    const std::function<at::Tensor(const std::vector<at::Tensor>&)>& reference,
                    double tol) {
  std::vector<at::Tensor> f32, f64;
  for (size_t i = 0; i < inputs.size(); ++i) {
    f32.push_back(inputs[i].clone().requires_grad_(requires_grad[i]));
    f64.push_back(inputs[i].to(at::kDouble).requires_grad_(requires_grad[i]));
  }
  const at::Tensor out32 = fused(f32), out64 = reference(f64);
  ASSERT_EQ(out32.sizes(), out64.sizes());
  EXPECT_LT(max_error(out32, out64), tol) << "forward";
  const at::Tensor upstream = at::randn(out64.sizes(), at::kDouble);
  out32.backward(upstream.to(at::kFloat));
  out64.backward(upstream);
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!requires_grad[i]) continue;
    ASSERT_TRUE(f32[i].grad().defined()) << "input " << i;
    EXPECT_LT(max_error(f32[i].grad(), f64[i].grad()), tol) << "gradient of input " << i;
  }
}

at::Tensor reference_rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

at::Tensor reference_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t t = x.size(1);
  const at::Tensor pairs = x.unflatten(-1, {-1, 2});
  const at::Tensor x0 = pairs.select(-1, 0), x1 = pairs.select(-1, 1);
  const at::Tensor c = cos.narrow(0, 0, t).unsqueeze(1), s = sin.narrow(0, 0, t).unsqueeze(1);
  return at::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(-2);
}

at::Tensor reference_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t b = q.size(0), t = q.size(1), h = q.size(2), kv = k.size(2), hd = q.size(3);
  const at::Tensor ke = k.unsqueeze(3).expand({b, t, kv, h / kv, hd}).reshape({b, t, h, hd});
  const at::Tensor ve = v.unsqueeze(3).expand({b, t, kv, h / kv, hd}).reshape({b, t, h, hd});
  at::Tensor scores =
      at::matmul(q.transpose(1, 2), ke.transpose(1, 2).transpose(-2, -1)) / std::sqrt(double(hd));
  const at::Tensor future = at::ones({t, t}, at::kBool).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  return at::matmul(at::softmax(scores, -1), ve.transpose(1, 2)).transpose(1, 2);  // (B, T, H, hd)
}

class FusedOps : public ::testing::Test {
 protected:
  void SetUp() override { at::manual_seed(7); }
};

TEST_F(FusedOps, RmsNormMatchesTheComposition) {
  const at::Tensor x = at::randn({3, 70, 48}), w = at::rand({48}) + 0.5;
  auto fused = [](const std::vector<at::Tensor>& in) {
    return fused::rms_norm(in[0], in[1], 1e-5);
  };
  auto reference = [](const std::vector<at::Tensor>& in) {
    return reference_rms_norm(in[0], in[1], 1e-5);
  };
  expect_matches({x, w}, {true, true}, fused, reference, 1e-5);
  // A frozen weight (LoRA's base): only the input gradient.
  expect_matches({x, w}, {true, false}, fused, reference, 1e-5);
}

TEST_F(FusedOps, RopeMatchesTheComposition) {
  const int64_t hd = 16, max_len = 40;
  const at::Tensor inv =
      at::pow(10000.0, at::arange(0, hd, 2, at::kDouble) / double(hd)).reciprocal();
  const at::Tensor angles = at::outer(at::arange(max_len, at::kDouble), inv);
  const at::Tensor cos = angles.cos().to(at::kFloat), sin = angles.sin().to(at::kFloat);
  const at::Tensor x = at::randn({2, 33, 3, hd});
  auto fused = [&](const std::vector<at::Tensor>& in) { return fused::rope(in[0], cos, sin); };
  auto reference = [&](const std::vector<at::Tensor>& in) {
    return reference_rope(in[0], cos.to(at::kDouble), sin.to(at::kDouble));
  };
  expect_matches({x}, {true}, fused, reference, 1e-5);
}

TEST_F(FusedOps, SwiGluMatchesTheComposition) {
  const at::Tensor a = at::randn({4, 37, 50}) * 4,
                   b = at::randn({4, 37, 50});  // exp over a wide range
  auto fused = [](const std::vector<at::Tensor>& in) { return fused::swiglu(in[0], in[1]); };
  auto reference = [](const std::vector<at::Tensor>& in) { return at::silu(in[0]) * in[1]; };
  expect_matches({a, b}, {true, true}, fused, reference, 1e-5);
}

TEST_F(FusedOps, PackedSwiGluMatchesTheComposition) {
  const at::Tensor ab = at::randn({3, 21, 2 * 40}) * 4;
  auto fused = [](const std::vector<at::Tensor>& in) { return fused::swiglu(in[0]); };
  auto reference = [](const std::vector<at::Tensor>& in) {
    return at::silu(in[0].narrow(-1, 0, 40)) * in[0].narrow(-1, 40, 40);
  };
  expect_matches({ab}, {true}, fused, reference, 1e-5);
}

TEST_F(FusedOps, QkvRopeSplitsAndRotatesTheFusedProjection) {
  const int64_t h = 4, kv = 2, hd = 8, t = 19;
  const at::Tensor inv =
      at::pow(10000.0, at::arange(0, hd, 2, at::kDouble) / double(hd)).reciprocal();
  const at::Tensor angles = at::outer(at::arange(32, at::kDouble), inv);
  const at::Tensor cos = angles.cos().to(at::kFloat), sin = angles.sin().to(at::kFloat);
  const at::Tensor qkv = at::randn({2, t, (h + 2 * kv) * hd});
  // All three outputs in one tensor, so that one upstream gradient reaches each of them.
  auto fused = [&](const std::vector<at::Tensor>& in) {
    auto [q, k, v] = fused::qkv_rope(in[0], h, kv, cos, sin);
    return at::cat({q.flatten(2), k.flatten(2), v.flatten(2)}, -1);
  };
  auto reference = [&](const std::vector<at::Tensor>& in) {
    const at::Tensor c = cos.to(at::kDouble), s = sin.to(at::kDouble);
    const at::Tensor q = reference_rope(in[0].narrow(-1, 0, h * hd).reshape({2, t, h, hd}), c, s);
    const at::Tensor k =
        reference_rope(in[0].narrow(-1, h * hd, kv * hd).reshape({2, t, kv, hd}), c, s);
    return at::cat({q.flatten(2), k.flatten(2), in[0].narrow(-1, (h + kv) * hd, kv * hd)}, -1);
  };
  expect_matches({qkv}, {true}, fused, reference, 1e-5);
}

TEST_F(FusedOps, CausalAttentionMatchesTheCompositionAcrossRowBlocksWithGqa) {
  if (!fused::has_blas()) GTEST_SKIP() << "the BLAS exports no sgemm_";
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {70, 4, 2}, {129, 2, 2}, {5, 3, 1}};
  for (const auto& [t, h, kv] : shapes) {
    const at::Tensor q = at::randn({2, t, h, 8}), k = at::randn({2, t, kv, 8}),
                     v = at::randn({2, t, kv, 8});
    auto fused = [](const std::vector<at::Tensor>& in) {
      return fused::causal_attention(in[0], in[1], in[2]);
    };
    auto reference = [](const std::vector<at::Tensor>& in) {
      return reference_attention(in[0], in[1], in[2]);
    };
    SCOPED_TRACE(::testing::Message() << "T " << t << ", heads " << h << ", kv heads " << kv);
    expect_matches({q, k, v}, {true, true, true}, fused, reference, 1e-5);
  }
}

TEST_F(FusedOps, CausalAttentionRefusesHeadsThatDoNotGroup) {
  const at::Tensor q = at::randn({1, 4, 3, 8}), k = at::randn({1, 4, 2, 8});
  try {
    fused::causal_attention(q, k, k);
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(),
                 "causal_attention: 3 query heads are not a multiple of 2 key/value heads");
  }
}

TEST_F(FusedOps, CrossEntropyMatchesTheCompositionWithAndWithoutGrad) {
  const at::Tensor logits = at::randn({150, 300}) * 3, targets = at::randint(0, 300, {150});
  auto fused = [&](const std::vector<at::Tensor>& in) {
    return fused::cross_entropy(in[0], targets);
  };
  auto reference = [&](const std::vector<at::Tensor>& in) {
    return at::cross_entropy_loss(in[0], targets);
  };
  expect_matches({logits}, {true}, fused, reference, 1e-6);
  at::NoGradGuard no_grad;
  EXPECT_LT(max_error(fused::cross_entropy(logits, targets),
                      at::cross_entropy_loss(logits.to(at::kDouble), targets)),
            1e-6);
}

TEST_F(FusedOps, CrossEntropyRefusesTargetsOutsideTheVocabulary) {
  const at::Tensor logits = at::randn({3, 10});
  try {
    fused::cross_entropy(logits, at::tensor({1, 10, 2}, at::kLong));
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "cross_entropy: target 10 of row 1 is outside [0, 10)");
  }
}

// Every kernel gives the same bits whatever the number of threads (rows and heads are each
// computed by one thread; cross-row sums go over fixed blocks in a fixed order).
TEST_F(FusedOps, ResultsDoNotDependOnTheThreadCount) {
  const at::Tensor x = at::randn({2, 150, 4, 16}), w = at::rand({64});
  const at::Tensor k = at::randn({2, 150, 2, 16}), v = at::randn({2, 150, 2, 16});
  auto run = [&](int threads) {
    at::set_num_threads(threads);
    std::vector<at::Tensor> leaves = {
        x.clone().requires_grad_(true), w.clone().requires_grad_(true),
        k.clone().requires_grad_(true), v.clone().requires_grad_(true)};
    at::Tensor h =
        fused::rms_norm(leaves[0].view({2, 150, 64}), leaves[1], 1e-5).view({2, 150, 4, 16});
    at::Tensor y = fused::causal_attention(h, leaves[2], leaves[3]);
    at::Tensor loss =
        fused::cross_entropy(fused::swiglu(y, y).reshape({300, 64}), at::arange(300) % 64);
    loss.backward();
    std::vector<at::Tensor> out = {loss.detach()};
    for (const at::Tensor& l : leaves) out.push_back(l.grad());
    return out;
  };
  const int before = at::get_num_threads();
  const auto one = run(1), two = run(2);
  at::set_num_threads(before);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(at::equal(one[i], two[i])) << "tensor " << i;
}

}  // namespace
}  // namespace strata
