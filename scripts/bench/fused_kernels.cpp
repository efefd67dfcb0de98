// Strata's fused CPU kernels (trainer/fused_ops.h) against the best ATen equivalent on the
// LibTorch Strata is built with: forward + backward of each kernel on a model's shapes, the two
// alternating A B A B, median time of each. Prints a Markdown table with fused / ATen.
//   bench_fused_kernels [--shape tiny|small] [--threads N] [--reps R]
// Built on demand: scripts/bench/fused_kernels.sh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "trainer/kernels/fused_ops.h"

namespace {

struct Shape {
  const char* name;
  int64_t batch, seq, dim, heads, kv_heads, ffn, vocab;
  int64_t head_dim() const { return dim / heads; }
};

// configs/tiny.yaml's model and micro-batch; the "small" model of train_throughput.sh.
constexpr Shape kTiny{"tiny", 8, 128, 192, 6, 2, 512, 2048};
constexpr Shape kSmall{"small", 1, 512, 512, 8, 4, 1536, 4096};

using Step = std::function<void()>;

double seconds(const Step& step) {
  const auto start = std::chrono::steady_clock::now();
  step();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// forward + backward of out = fn(leaves) with a fixed upstream gradient.
Step fwd_bwd(std::vector<at::Tensor> leaves,
             std::function<at::Tensor(const std::vector<at::Tensor>&)> fn) {
  for (auto& t : leaves) t.requires_grad_(true);
  const at::Tensor probe = fn(leaves);
  const at::Tensor upstream = at::randn(probe.sizes());
  return [leaves, fn, upstream] {
    for (const auto& t : leaves) t.mutable_grad().reset();
    fn(leaves).backward(upstream);
  };
}

at::Tensor aten_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t t = x.size(1);
  const at::Tensor pairs = x.unflatten(-1, {-1, 2});
  const at::Tensor x0 = pairs.select(-1, 0), x1 = pairs.select(-1, 1);
  const at::Tensor c = cos.narrow(0, 0, t).unsqueeze(1), s = sin.narrow(0, 0, t).unsqueeze(1);
  return at::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(-2);
}

struct Row {
  std::string kernel, aten;
  Step fused, reference;
};

std::vector<Row> rows_for(const Shape& s) {
  const int64_t n = s.batch * s.seq, hd = s.head_dim();
  const at::Tensor cos = at::rand({s.seq, hd / 2}), sin = at::rand({s.seq, hd / 2});
  std::vector<Row> rows;
  {
    const at::Tensor x = at::randn({s.batch, s.seq, s.dim}), w = at::rand({s.dim});
    rows.push_back(
        {"RMSNorm", "at::rms_norm",
         fwd_bwd({x.clone(), w.clone()},
                 [](const auto& in) { return strata::fused::rms_norm(in[0], in[1], 1e-5); }),
         fwd_bwd({x.clone(), w.clone()}, [&](const auto& in) {
           return at::rms_norm(in[0], {in[0].size(-1)}, in[1], 1e-5);
         })});
  }
  {
    const at::Tensor x = at::randn({s.batch, s.seq, s.heads, hd});
    rows.push_back(
        {"RoPE (q)", "unflatten/select/mul/stack",
         fwd_bwd({x.clone()},
                 [cos, sin](const auto& in) { return strata::fused::rope(in[0], cos, sin); }),
         fwd_bwd({x.clone()}, [cos, sin](const auto& in) { return aten_rope(in[0], cos, sin); })});
  }
  {
    const at::Tensor ab = at::randn({s.batch, s.seq, 2 * s.ffn});
    rows.push_back(
        {"SwiGLU (packed)", "silu(a) * b on chunks",
         fwd_bwd({ab.clone()}, [](const auto& in) { return strata::fused::swiglu(in[0]); }),
         fwd_bwd({ab.clone()}, [](const auto& in) {
           const auto parts = in[0].chunk(2, -1);
           return at::silu(parts[0]) * parts[1];
         })});
  }
  {
    const at::Tensor q = at::randn({s.batch, s.seq, s.heads, hd}),
                     k = at::randn({s.batch, s.seq, s.kv_heads, hd}),
                     v = at::randn({s.batch, s.seq, s.kv_heads, hd});
    rows.push_back(
        {"causal attention (GQA)", "scaled_dot_product_attention(is_causal, enable_gqa)",
         fwd_bwd(
             {q.clone(), k.clone(), v.clone()},
             [](const auto& in) { return strata::fused::causal_attention(in[0], in[1], in[2]); }),
         fwd_bwd({q.clone(), k.clone(), v.clone()}, [gqa = s.kv_heads != s.heads](const auto& in) {
           return at::scaled_dot_product_attention(in[0].transpose(1, 2), in[1].transpose(1, 2),
                                                   in[2].transpose(1, 2), {}, 0.0, true,
                                                   std::nullopt, gqa)
               .transpose(1, 2);
         })});
  }
  {
    const at::Tensor logits = at::randn({n, s.vocab}),
                     targets = at::randint(0, s.vocab, {n}, at::kLong);
    rows.push_back({"cross-entropy", "at::cross_entropy_loss",
                    fwd_bwd({logits.clone()},
                            [targets](const auto& in) {
                              return strata::fused::cross_entropy(in[0], targets);
                            }),
                    fwd_bwd({logits.clone()}, [targets](const auto& in) {
                      return at::cross_entropy_loss(in[0], targets);
                    })});
  }
  {
    // AdamW over all of a block's matrices at once: 4 d^2 (attention, roughly) + 3 d f.
    const int64_t numel = 4 * s.dim * s.dim + 3 * s.dim * s.ffn;
    auto p = at::randn({numel}), g = at::randn({numel}), m = at::zeros({numel}),
         v = at::zeros({numel});
    auto p2 = p.clone(), m2 = m.clone(), v2 = v.clone(), steps = at::zeros({1});
    const strata::fused::AdamWScalars sc{1e-4f, 0.9f, 0.95f, 1e-3f, 1.0f, 1e-8f};
    rows.push_back({"AdamW update", "at::_fused_adamw_ (torch.optim.AdamW(fused=True))",
                    [=]() mutable { strata::fused::adamw_update(p, g, m, v, at::Tensor(), sc); },
                    [=]() mutable {
                      at::_fused_adamw_({p2}, {g}, {m2}, {v2}, {}, {steps}, 1e-3, 0.9, 0.95, 0.1,
                                        1e-8, false, false);
                    }});
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  Shape shape = kTiny;
  int threads = 1, reps = 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--shape") == 0) {
      shape = std::strcmp(argv[i + 1], "small") == 0 ? kSmall : kTiny;
    } else if (std::strcmp(argv[i], "--threads") == 0) {
      threads = std::atoi(argv[i + 1]);
    } else if (std::strcmp(argv[i], "--reps") == 0) {
      reps = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: %s [--shape tiny|small] [--threads N] [--reps R]\n", argv[0]);
      return 2;
    }
  }
  at::set_num_threads(threads);
  at::manual_seed(1);
  std::printf(
      "| shape | threads | kernel (fwd + bwd) | fused ms | ATen ms | ATen op | fused / ATen time "
      "|\n");
  std::printf("| --- | ---: | --- | ---: | ---: | --- | ---: |\n");
  for (const Row& row : rows_for(shape)) {
    for (int i = 0; i < 3; ++i) {  // warm-up
      row.fused();
      row.reference();
    }
    std::vector<double> fused, reference;
    for (int i = 0; i < reps; ++i) {  // alternating
      fused.push_back(seconds(row.fused));
      reference.push_back(seconds(row.reference));
    }
    const double f = median(fused) * 1e3, r = median(reference) * 1e3;
    std::printf("| %s (B %lld, T %lld, D %lld) | %d | %s | %.3f | %.3f | %s | **%.2f** |\n",
                shape.name, static_cast<long long>(shape.batch), static_cast<long long>(shape.seq),
                static_cast<long long>(shape.dim), threads, row.kernel.c_str(), f, r,
                row.aten.c_str(), f / r);
  }
  return 0;
}
