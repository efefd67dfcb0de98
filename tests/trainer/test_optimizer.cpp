// AdamW, gradient clipping and the learning-rate schedule.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "trainer/kernels/fused_ops.h"
#include "trainer/optim/adamw.h"
#include "trainer/optim/lr_schedule.h"

namespace strata {
namespace {

TEST(AdamW, MatchesTheReferenceUpdateStepByStep) {
  OptimizerConfig c;
  c.lr = 0.1;
  c.betas = {0.9, 0.99};
  c.eps = 1e-8;
  c.weight_decay = 0.5;
  AdamW opt(c);
  at::Tensor w = at::tensor({1.0, -2.0}, at::kDouble).requires_grad_(true);
  at::Tensor b = at::tensor({0.5}, at::kDouble).requires_grad_(true);
  opt.add_parameter("w", w, /*decay=*/true);
  opt.add_parameter("b", b, /*decay=*/false);

  // Scalar reference (torch.optim.AdamW's algorithm) for the first element of each.
  double rw = 1.0, rb = 0.5, mw = 0, vw = 0, mb = 0, vb = 0;
  for (int t = 1; t <= 5; ++t) {
    const double gw = 0.3 * t, gb = -0.2;
    w.mutable_grad() = at::tensor({gw, 1.0}, at::kDouble);
    b.mutable_grad() = at::tensor({gb}, at::kDouble);
    const double lr = 0.1 / t;
    opt.step(lr);
    auto ref = [&](double& p, double& m, double& v, double g, bool decay) {
      if (decay) p *= 1 - lr * c.weight_decay;
      m = 0.9 * m + 0.1 * g;
      v = 0.99 * v + 0.01 * g * g;
      const double mhat = m / (1 - std::pow(0.9, t)), vhat = v / (1 - std::pow(0.99, t));
      p -= lr * mhat / (std::sqrt(vhat) + c.eps);
    };
    ref(rw, mw, vw, gw, true);
    ref(rb, mb, vb, gb, false);
    EXPECT_NEAR(w[0].item<double>(), rw, 1e-12) << "step " << t;
    EXPECT_NEAR(b[0].item<double>(), rb, 1e-12) << "step " << t;
  }
  EXPECT_EQ(opt.steps_taken(), 5);
  EXPECT_TRUE(opt.state().contains("w.exp_avg_sq"));
}

TEST(AdamW, WeightDecaySkipsNormsAndEmbeddings) {
  EXPECT_TRUE(uses_weight_decay("layers.0.attention.wq.weight", 2));
  EXPECT_TRUE(uses_weight_decay("output.weight", 2));
  EXPECT_FALSE(uses_weight_decay("tok_embeddings.weight", 2));
  EXPECT_FALSE(uses_weight_decay("layers.0.ffn_norm.weight", 1));
  EXPECT_FALSE(uses_weight_decay("norm.weight", 1));
}

TEST(AdamW, DecayMaskAppliesWeightDecayPerElement) {
  OptimizerConfig c;
  c.lr = 0.1;
  c.weight_decay = 0.5;
  AdamW masked(c), reference(c);
  at::Tensor flat = at::tensor({1.0, 2.0}, at::kDouble).requires_grad_(true);
  at::Tensor a = at::tensor({1.0}, at::kDouble).requires_grad_(true);
  at::Tensor b = at::tensor({2.0}, at::kDouble).requires_grad_(true);
  masked.add_parameter("flat", flat, at::tensor({1.0, 0.0}, at::kDouble));
  reference.add_parameter("a", a, true);
  reference.add_parameter("b", b, false);
  for (int t = 0; t < 3; ++t) {
    flat.mutable_grad() = at::tensor({0.1, -0.2}, at::kDouble);
    a.mutable_grad() = at::tensor({0.1}, at::kDouble);
    b.mutable_grad() = at::tensor({-0.2}, at::kDouble);
    masked.step(0.1);
    reference.step(0.1);
  }
  EXPECT_DOUBLE_EQ(flat[0].item<double>(), a[0].item<double>());
  EXPECT_DOUBLE_EQ(flat[1].item<double>(), b[0].item<double>());
}

TEST(ClipGradNorm, ScalesToTheGlobalNormAndReportsItUnclipped) {
  at::Tensor a = at::zeros({2}).requires_grad_(true);
  at::Tensor b = at::zeros({1}).requires_grad_(true);
  a.mutable_grad() = at::tensor({3.0f, 0.0f});
  b.mutable_grad() = at::tensor({4.0f});
  EXPECT_NEAR(clip_grad_norm({a, b}, 1.0), 5.0, 1e-6);
  EXPECT_NEAR(a.grad()[0].item<double>(), 0.6, 1e-5);
  EXPECT_NEAR(b.grad()[0].item<double>(), 0.8, 1e-5);
  // Below the limit, or disabled: untouched.
  EXPECT_NEAR(clip_grad_norm({a, b}, 10.0), 1.0, 1e-5);
  EXPECT_NEAR(a.grad()[0].item<double>(), 0.6, 1e-5);
  EXPECT_NEAR(clip_grad_norm({a, b}, 0.0), 1.0, 1e-5);
}

// The clipping as it was before clip_grad_norm_ (a host-side fp64 norm, a host-side decision):
// the reference the tensor version must match within 1e-6 relative.
double reference_clip(const std::vector<at::Tensor>& params, double max_norm) {
  double total = 0.0;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) total += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  }
  const double norm = std::sqrt(total);
  if (max_norm > 0.0 && norm > max_norm) {
    for (const at::Tensor& p : params) {
      if (p.grad().defined()) p.grad().mul_(max_norm / (norm + 1e-6));
    }
  }
  return norm;
}

// Parameters with random gradients of `dtype` (one without a gradient), twice: for the
// reference and for clip_grad_norm_.
std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> twin_params(at::ScalarType dtype) {
  at::manual_seed(7);
  std::vector<at::Tensor> a, b;
  for (std::vector<int64_t> shape : {std::vector<int64_t>{64, 33}, {1000}, {3}, {17, 5, 2}}) {
    at::Tensor grad = at::randn(shape, at::kDouble).mul(0.1).to(dtype);
    a.push_back(at::zeros(shape, dtype).requires_grad_(true));
    b.push_back(at::zeros(shape, dtype).requires_grad_(true));
    a.back().mutable_grad() = grad.clone();
    b.back().mutable_grad() = grad.clone();
  }
  a.push_back(at::zeros({4}, dtype).requires_grad_(true));  // no gradient: skipped
  b.push_back(at::zeros({4}, dtype).requires_grad_(true));
  return {a, b};
}

TEST(ClipGradNorm, TheTensorVersionMatchesTheHostFormula) {
  for (bool fused_kernels : {true, false}) {
    fused::set_enabled(fused_kernels);
    for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
      for (double max_norm : {0.0, 0.5, 1e3}) {  // off, clipping, within the limit
        auto [reference, params] = twin_params(dtype);
        const double want = reference_clip(reference, max_norm);
        const at::Tensor norm = clip_grad_norm_(params, max_norm);
        const std::string what =
            fmt::format("{} max_norm {} fused {}", c10::toString(dtype), max_norm, fused_kernels);
        EXPECT_EQ(norm.dim(), 0) << what;
        EXPECT_EQ(norm.device(), params[0].device()) << what;
        EXPECT_TRUE(norm.scalar_type() == at::kDouble || norm.scalar_type() == at::kFloat);
        EXPECT_NEAR(norm.item<double>(), want, 1e-6 * want) << what;
        for (size_t i = 0; i + 1 < params.size(); ++i) {
          const at::Tensor got = params[i].grad().to(at::kDouble);
          const at::Tensor ref = reference[i].grad().to(at::kDouble);
          // Within one rounding of the gradient's dtype (a scale 1e-6 apart rounds apart).
          const double ulp = dtype == at::kBFloat16 ? 1.0 / 128
                             : dtype == at::kFloat  ? 1e-6
                                                    : 1e-12;
          EXPECT_LE((got - ref).abs().max().item<double>(), ulp * ref.abs().max().item<double>())
              << what << " param " << i;
        }
        EXPECT_FALSE(params.back().grad().defined());
      }
    }
  }
  fused::set_enabled(true);
}

TEST(ClipGradNorm, WithinTheLimitTheGradientsAreUntouched) {
  auto [reference, params] = twin_params(at::kFloat);
  clip_grad_norm_(params, 1e6);
  for (size_t i = 0; i + 1 < params.size(); ++i) {
    EXPECT_TRUE(at::equal(params[i].grad(), reference[i].grad())) << i;
  }
  // No gradient at all: a zero norm, nothing to scale.
  at::Tensor lone = at::zeros({3}).requires_grad_(true);
  EXPECT_EQ(clip_grad_norm_({lone}, 1.0).item<double>(), 0.0);
  EXPECT_EQ(clip_grad_norm_({}, 1.0).item<double>(), 0.0);
}

TEST(LrSchedule, WarmsUpLinearlyThenDecaysToTheFloor) {
  LrSchedulerConfig c;
  c.warmup_steps = 10;
  c.min_lr_ratio = 0.1;
  c.decay = LrDecay::kCosine;
  LrSchedule cosine(1.0, c, 110);
  EXPECT_DOUBLE_EQ(cosine.at(1), 0.1);
  EXPECT_DOUBLE_EQ(cosine.at(10), 1.0);
  EXPECT_NEAR(cosine.at(60), 0.55, 1e-12);  // halfway: floor + (1 - floor) / 2
  EXPECT_NEAR(cosine.at(110), 0.1, 1e-12);
  for (int64_t s = 11; s < 110; ++s) EXPECT_GE(cosine.at(s), cosine.at(s + 1));

  c.decay = LrDecay::kLinear;
  LrSchedule linear(2.0, c, 110);
  EXPECT_NEAR(linear.at(60), 2.0 * 0.55, 1e-12);
  EXPECT_NEAR(linear.at(110), 0.2, 1e-12);

  c.decay = LrDecay::kNone;
  EXPECT_DOUBLE_EQ(LrSchedule(3.0, c, 110).at(100), 3.0);

  c.warmup_steps = 0;
  c.decay = LrDecay::kCosine;
  EXPECT_DOUBLE_EQ(LrSchedule(1.0, c, 100).at(1), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 100)));
}

}  // namespace
}  // namespace strata
