// Fused CPU kernels for the Llama block (see fused_ops.h); causal attention is in
// fused_attention.cpp. The loops are compiled per ISA (fused_simd.h).
#include "trainer/kernels/fused_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "trainer/kernels/fused_simd.h"

namespace strata::fused {
namespace {

using detail::exp_approx;
using detail::kRowBlock;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// RMSNorm

STRATA_CLONES void rms_forward_rows(const float* x, const float* w, float* y, float* rstd,
                                    int64_t r0, int64_t r1, int64_t d, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
    const float s = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[r] = s;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * s * w[j];
  }
}

// dx for rows [r0, r1) and their contribution to dw (into dw_block, overwritten).
STRATA_CLONES void rms_backward_rows(const float* x, const float* w, const float* rstd,
                                     const float* dy, float* dx, float* dw_block, int64_t r0,
                                     int64_t r1, int64_t d) {
  if (dw_block) std::fill(dw_block, dw_block + d, 0.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    const float s = rstd[r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < d; ++j) dot += dyr[j] * w[j] * xr[j];
    const float c = s * s * s * dot / static_cast<float>(d);
    if (dx) {
      float* dxr = dx + r * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dxr[j] = s * dyr[j] * w[j] - xr[j] * c;
    }
    if (dw_block) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dw_block[j] += dyr[j] * xr[j] * s;
    }
  }
}

STRATA_CLONES void add_row(float* acc, const float* row, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) acc[j] += row[j];
}

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, double eps) {
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / d;
    at::Tensor y = at::empty_like(x), rstd = at::empty({rows}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float *yp = y.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / d), [&](int64_t b, int64_t e) {
      rms_forward_rows(xp, wp, yp, sp, b, e, d, static_cast<float>(eps));
    });
    ctx->save_for_backward({x, w, rstd});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor dy = grads[0].contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / d, blocks = (rows + kRowBlock - 1) / kRowBlock;
    const bool want_dx = ctx->needs_input_grad(0), want_dw = ctx->needs_input_grad(1);
    at::Tensor dx = want_dx ? at::empty_like(x) : at::Tensor();
    at::Tensor partial = want_dw ? at::empty({blocks, d}, x.options()) : at::Tensor();
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    const float* dyp = dy.data_ptr<float>();
    float* dxp = want_dx ? dx.data_ptr<float>() : nullptr;
    float* pp = want_dw ? partial.data_ptr<float>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        rms_backward_rows(xp, wp, sp, dyp, dxp, pp ? pp + blk * d : nullptr, blk * kRowBlock,
                          std::min(rows, (blk + 1) * kRowBlock), d);
      }
    });
    // Blocks summed in order: the same result for any thread count.
    at::Tensor dw;
    if (want_dw) {
      dw = partial[0].clone();
      float* dwp = dw.data_ptr<float>();
      for (int64_t blk = 1; blk < blocks; ++blk) add_row(dwp, pp + blk * d, d);
    }
    return {dx, dw, at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// Rotary embedding

// One head's hd = 2 half values: pairs (x[2i], x[2i+1]) rotated by +angle (sign 1, forward) or
// -angle (sign -1, the gradient).
inline __attribute__((always_inline)) void rope_head(const float* x, float* y, const float* c,
                                                     const float* s, int64_t half, float sign) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1], si = sign * s[i];
    y[2 * i] = x0 * c[i] - x1 * si;
    y[2 * i + 1] = x0 * si + x1 * c[i];
  }
}

STRATA_CLONES void rope_rows(const float* x, const float* cos, const float* sin, float* y,
                             int64_t r0, int64_t r1, int64_t heads, int64_t seq, int64_t half,
                             float sign) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = (r / heads) % seq;
    rope_head(x + r * 2 * half, y + r * 2 * half, cos + t * half, sin + t * half, half, sign);
  }
}

// Token rows [r0, r1) of the fused projection qkv (row: h query heads, kv key heads, kv value
// heads, hd values each) <-> q (rows of h heads), k, v (rows of kv heads); q and k rotated.
// forward: qkv -> q, k, v with the angles; backward: dq, dk, dv -> dqkv with their negatives.
struct QkvLayout {
  int64_t h, kv, hd, seq;
  int64_t width() const { return (h + 2 * kv) * hd; }
};
STRATA_CLONES void qkv_split_rows(const float* qkv, float* q, float* k, float* v, const float* cos,
                                  const float* sin, QkvLayout l, int64_t r0, int64_t r1) {
  const int64_t half = l.hd / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = qkv + r * l.width();
    const float *c = cos + (r % l.seq) * half, *s = sin + (r % l.seq) * half;
    for (int64_t j = 0; j < l.h; ++j)
      rope_head(row + j * l.hd, q + (r * l.h + j) * l.hd, c, s, half, 1.0f);
    for (int64_t j = 0; j < l.kv; ++j)
      rope_head(row + (l.h + j) * l.hd, k + (r * l.kv + j) * l.hd, c, s, half, 1.0f);
    std::copy(row + (l.h + l.kv) * l.hd, row + l.width(), v + r * l.kv * l.hd);
  }
}
STRATA_CLONES void qkv_merge_rows(const float* dq, const float* dk, const float* dv, float* dqkv,
                                  const float* cos, const float* sin, QkvLayout l, int64_t r0,
                                  int64_t r1) {
  const int64_t half = l.hd / 2;
  for (int64_t r = r0; r < r1; ++r) {
    float* row = dqkv + r * l.width();
    const float *c = cos + (r % l.seq) * half, *s = sin + (r % l.seq) * half;
    for (int64_t j = 0; j < l.h; ++j)
      rope_head(dq + (r * l.h + j) * l.hd, row + j * l.hd, c, s, half, -1.0f);
    for (int64_t j = 0; j < l.kv; ++j)
      rope_head(dk + (r * l.kv + j) * l.hd, row + (l.h + j) * l.hd, c, s, half, -1.0f);
    std::copy(dv + r * l.kv * l.hd, dv + (r + 1) * l.kv * l.hd, row + (l.h + l.kv) * l.hd);
  }
}

struct QkvRopeFunction : public torch::autograd::Function<QkvRopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& cos,
                               const at::Tensor& sin, int64_t h, int64_t kv) {
    const at::Tensor qkv = input.contiguous();
    const int64_t b = qkv.size(0), t = qkv.size(1), hd = qkv.size(2) / (h + 2 * kv);
    const QkvLayout layout{h, kv, hd, t};
    at::Tensor q = at::empty({b, t, h, hd}, qkv.options()),
               k = at::empty({b, t, kv, hd}, qkv.options());
    at::Tensor v = at::empty({b, t, kv, hd}, qkv.options());
    const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(),
                *sp = sin.data_ptr<float>();
    float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    at::parallel_for(
        0, b * t, std::max<int64_t>(1, 8192 / layout.width()),
        [&](int64_t s, int64_t e) { qkv_split_rows(src, qp, kp, vp, cp, sp, layout, s, e); });
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["h"] = h;
    ctx->saved_data["kv"] = kv;
    return {q, k, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Autograd hands zeros for an output that got no gradient (grads are materialised).
    const int64_t h = ctx->saved_data["h"].toInt(), kv = ctx->saved_data["kv"].toInt();
    const at::Tensor g[] = {grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous()};
    const int64_t b = g[0].size(0), t = g[0].size(1), hd = g[0].size(3);
    const QkvLayout layout{h, kv, hd, t};
    at::Tensor dqkv = at::empty({b, t, layout.width()}, g[0].options());
    const at::Tensor cos = ctx->saved_data["cos"].toTensor(),
                     sin = ctx->saved_data["sin"].toTensor();
    const float *dq = g[0].data_ptr<float>(), *dk = g[1].data_ptr<float>(),
                *dv = g[2].data_ptr<float>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    float* out = dqkv.data_ptr<float>();
    at::parallel_for(
        0, b * t, std::max<int64_t>(1, 8192 / layout.width()),
        [&](int64_t s, int64_t e) { qkv_merge_rows(dq, dk, dv, out, cp, sp, layout, s, e); });
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor rotate(const at::Tensor& input, const at::Tensor& cos, const at::Tensor& sin,
                  float sign) {
  const at::Tensor x = input.contiguous();
  const int64_t seq = x.size(1), heads = x.size(2), half = x.size(3) / 2,
                rows = x.numel() / (2 * half);
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / (2 * half)), [&](int64_t b, int64_t e) {
    rope_rows(xp, cp, sp, yp, b, e, heads, seq, half, sign);
  });
  return y;
}

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                               const at::Tensor& sin) {
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    return {rotate(x, cos, sin, 1.0f)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {rotate(grads[0], ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor(),
                   -1.0f),
            at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// SwiGLU

// Rows [r0, r1) of a and b (f values each, row stride ld): y (row stride f) = silu(a) * b.
STRATA_CLONES void swiglu_forward_rows(const float* a, const float* b, int64_t ld, float* y,
                                       int64_t f, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *ar = a + r * ld, *br = b + r * ld;
    float* yr = y + r * f;
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) yr[j] = ar[j] / (1.0f + exp_approx(-ar[j])) * br[j];
  }
}

// The gradients of a and b (written with row stride ld) from dy (row stride f).
STRATA_CLONES void swiglu_backward_rows(const float* a, const float* b, int64_t ld, const float* dy,
                                        float* da, float* db, int64_t f, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *ar = a + r * ld, *br = b + r * ld, *dyr = dy + r * f;
    float *dar = da + r * ld, *dbr = db + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) {
      const float sig = 1.0f / (1.0f + exp_approx(-ar[j]));
      dar[j] = dyr[j] * br[j] * sig * (1.0f + ar[j] * (1.0f - sig));
      dbr[j] = dyr[j] * ar[j] * sig;
    }
  }
}

// a and b as row-strided views into the tensors the caller passes; y has rows of f values.
struct SwiGluRows {
  const float *a, *b;
  int64_t ld, f, rows;
  int64_t grain() const { return std::max<int64_t>(1, 16384 / f); }
  at::Tensor forward(const at::TensorOptions& options, at::IntArrayRef out_shape) const {
    at::Tensor y = at::empty(out_shape, options);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, rows, grain(),
                     [&](int64_t s, int64_t e) { swiglu_forward_rows(a, b, ld, yp, f, s, e); });
    return y;
  }
  void backward(const at::Tensor& dy, float* da, float* db) const {
    const at::Tensor g = dy.contiguous();
    const float* dyp = g.data_ptr<float>();
    at::parallel_for(0, rows, grain(), [&](int64_t s, int64_t e) {
      swiglu_backward_rows(a, b, ld, dyp, da, db, f, s, e);
    });
  }
};

struct SwiGluFunction : public torch::autograd::Function<SwiGluFunction> {
  static SwiGluRows rows_of(const at::Tensor& a, const at::Tensor& b) {
    const int64_t f = a.size(-1);
    return {a.data_ptr<float>(), b.data_ptr<float>(), f, f, a.numel() / f};
  }
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input_a,
                               const at::Tensor& input_b) {
    const at::Tensor a = input_a.contiguous(), b = input_b.contiguous();
    ctx->save_for_backward({a, b});
    return {rows_of(a, b).forward(a.options(), a.sizes())};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor da = at::empty_like(saved[0]), db = at::empty_like(saved[1]);
    rows_of(saved[0], saved[1]).backward(grads[0], da.data_ptr<float>(), db.data_ptr<float>());
    return {da, db};
  }
};

// ab (..., 2F): a in the first F columns, b in the last F (one GEMM made both).
struct PackedSwiGluFunction : public torch::autograd::Function<PackedSwiGluFunction> {
  static SwiGluRows rows_of(const at::Tensor& ab) {
    const int64_t f = ab.size(-1) / 2;
    const float* p = ab.data_ptr<float>();
    return {p, p + f, 2 * f, f, ab.numel() / (2 * f)};
  }
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input) {
    const at::Tensor ab = input.contiguous();
    std::vector<int64_t> shape = ab.sizes().vec();
    shape.back() /= 2;
    ctx->save_for_backward({ab});
    return {rows_of(ab).forward(ab.options(), shape)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ab = ctx->get_saved_variables()[0];
    at::Tensor dab = at::empty_like(ab);
    float* p = dab.data_ptr<float>();
    rows_of(ab).backward(grads[0], p, p + ab.size(-1) / 2);
    return {dab};
  }
};

// ---------------------------------------------------------------------------------------------
// Cross-entropy

// Rows [r0, r1): loss (lse - x[target]) into losses; with grad, softmax - one_hot into grad.
STRATA_CLONES void cross_entropy_rows(const float* x, const int64_t* targets, float* grad,
                                      double* losses, int64_t r0, int64_t r1, int64_t v) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * v;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < v; ++j) m = std::max(m, xr[j]);
    float sum = 0.0f;
    if (grad) {
      float* gr = grad + r * v;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < v; ++j) {
        gr[j] = exp_approx(xr[j] - m);
        sum += gr[j];
      }
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) gr[j] *= inv;
      gr[targets[r]] -= 1.0f;
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < v; ++j) sum += exp_approx(xr[j] - m);
    }
    losses[r] = static_cast<double>(m) + std::log(static_cast<double>(sum)) -
                static_cast<double>(xr[targets[r]]);
  }
}

struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  // want_grad: decided by the caller (in forward, grad mode is off and the node not yet made).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& target, bool want_grad) {
    const at::Tensor x = input.contiguous(), t = target.contiguous();
    const int64_t n = x.size(0), v = x.size(1);
    const int64_t* tp = t.data_ptr<int64_t>();
    for (int64_t r = 0; r < n; ++r) {
      if (tp[r] < 0 || tp[r] >= v) {
        throw std::invalid_argument(
            fmt::format("cross_entropy: target {} of row {} is outside [0, {})", tp[r], r, v));
      }
    }
    at::Tensor grad = want_grad ? at::empty_like(x) : at::Tensor();
    std::vector<double> losses(static_cast<size_t>(n));
    const float* xp = x.data_ptr<float>();
    float* gp = want_grad ? grad.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / v), [&](int64_t b, int64_t e) {
      cross_entropy_rows(xp, tp, gp, losses.data(), b, e, v);
    });
    double total = 0.0;
    for (double l : losses) total += l;
    if (want_grad) ctx->saved_data["grad"] = grad;
    ctx->saved_data["n"] = n;
    return {at::scalar_tensor(total / static_cast<double>(n), x.options())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Backward runs once (no retain_graph in training): the saved gradient is scaled in place.
    at::Tensor grad = ctx->saved_data["grad"].toTensor();
    ctx->saved_data.erase("grad");
    const double n = static_cast<double>(ctx->saved_data["n"].toInt());
    grad.mul_(grads[0].item<double>() / n);
    return {grad, at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// Optimizer

constexpr int64_t kElementBlock = 16384;  // elements per task of the optimizer kernels

STRATA_CLONES void adamw_range(float* p, const float* g, float* m, float* v, const float* mask,
                               AdamWScalars s, int64_t begin, int64_t end) {
  const float one_minus_beta1 = 1.0f - s.beta1, one_minus_beta2 = 1.0f - s.beta2;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float w = p[i];
    w -= s.decay * (mask ? mask[i] : 1.0f) * w;
    const float mi = m[i] + one_minus_beta1 * (g[i] - m[i]);
    const float vi = v[i] * s.beta2 + one_minus_beta2 * g[i] * g[i];
    m[i] = mi;
    v[i] = vi;
    p[i] = w - s.step_size * (mi / (std::sqrt(vi) / s.bias2_sqrt + s.eps));
  }
}

STRATA_CLONES double sum_of_squares_range(const float* x, int64_t begin, int64_t end) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i)
    sum += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return sum;
}

}  // namespace

void adamw_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& exp_avg_sq, const at::Tensor& decay_mask, const AdamWScalars& s) {
  const int64_t n = param.numel();
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&grad, &exp_avg, &exp_avg_sq}) {
    if (!t->is_contiguous() || t->numel() != n) {
      throw std::invalid_argument("adamw_update: tensors of different layouts");
    }
  }
  float *p = param.data_ptr<float>(), *m = exp_avg.data_ptr<float>(),
        *v = exp_avg_sq.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float* mask = decay_mask.defined() ? decay_mask.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, kElementBlock,
                   [&](int64_t b, int64_t e) { adamw_range(p, g, m, v, mask, s, b, e); });
}

double sum_of_squares(const at::Tensor& t) {
  const at::Tensor x = t.contiguous();
  const float* xp = x.data_ptr<float>();
  const int64_t n = x.numel(), blocks = (n + kElementBlock - 1) / kElementBlock;
  std::vector<double> partial(static_cast<size_t>(blocks));
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      partial[blk] =
          sum_of_squares_range(xp, blk * kElementBlock, std::min(n, (blk + 1) * kElementBlock));
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;  // in order: the same for any thread count
  return total;
}

namespace {
std::atomic<bool> switched_on{true};
}  // namespace

void set_enabled(bool on) {
  switched_on = on;
}

bool enabled(const at::Tensor& t) {
  return switched_on && t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RmsNormFunction::apply(x, weight, eps)[0];
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return RopeFunction::apply(x, cos.contiguous(), sin.contiguous())[0];
}

at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b) {
  return SwiGluFunction::apply(a, b)[0];
}

at::Tensor swiglu(const at::Tensor& ab) {
  return PackedSwiGluFunction::apply(ab)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv, int64_t heads,
                                                        int64_t kv_heads, const at::Tensor& cos,
                                                        const at::Tensor& sin) {
  const variable_list out =
      QkvRopeFunction::apply(qkv, cos.contiguous(), sin.contiguous(), heads, kv_heads);
  return {out[0], out[1], out[2]};
}

at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets) {
  return CrossEntropyFunction::apply(logits, targets,
                                     at::GradMode::is_enabled() && logits.requires_grad())[0];
}

}  // namespace strata::fused
