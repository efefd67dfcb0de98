// Causal attention on the CPU with BLAS (see fused_ops.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "trainer/kernels/fused_ops.h"
#include "trainer/kernels/fused_simd.h"

namespace strata::fused {
namespace {

using detail::exp_approx;
using detail::kRowBlock;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// Causal attention

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*);

SgemmFn sgemm() {
  static const SgemmFn fn = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return fn;
}

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C through the column-major BLAS (C^T =
// op(B)^T op(A)^T, and a row-major matrix is its transpose in column-major terms).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm()(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
}

// Columns [0, causal_span) of row i: the causal ones, [0, i], rounded up to whole vectors of 16
// (at most r1), so that the loops below run without scalar remainders; the extra columns are
// masked to 0.
inline int64_t causal_span(int64_t i, int64_t r1) {
  return std::min(r1, (i + 16) & ~int64_t{15});
}

// Rows [r0, r1) of the scores P (ld t) hold scaled logits in columns [0, r1): softmax over the
// causal columns [0, i] of row i, zeros in (i, r1).
STRATA_CLONES void causal_softmax_rows(float* p, int64_t t, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    float* row = p + i * t;
    const int64_t span = causal_span(i, r1);
    constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
    float m = kMinusInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < span; ++j) m = std::max(m, j <= i ? row[j] : kMinusInf);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < span; ++j) {
      const float e = j <= i ? exp_approx(row[j] - m) : 0.0f;
      row[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < span; ++j) row[j] *= inv;
    std::fill(row + span, row + r1, 0.0f);
  }
}

// dS = P * (dP - rowsum(P * dP)) over the causal columns of rows [r0, r1), in place in dp; P is
// zero beyond the causal columns, so dS is too.
STRATA_CLONES void causal_softmax_backward_rows(const float* p, float* dp, int64_t t, int64_t r0,
                                                int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* pr = p + i * t;
    float* dr = dp + i * t;
    const int64_t span = causal_span(i, r1);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < span; ++j) dot += pr[j] * dr[j];
#pragma omp simd
    for (int64_t j = 0; j < span; ++j) dr[j] = pr[j] * (dr[j] - dot);
    std::fill(dr + span, dr + r1, 0.0f);
  }
}

struct AttentionShape {
  int64_t b, t, h, kv, hd;
  explicit AttentionShape(const at::Tensor& q, const at::Tensor& k)
      : b(q.size(0)), t(q.size(1)), h(q.size(2)), kv(k.size(2)), hd(q.size(3)) {}
  int64_t rep() const { return h / kv; }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(hd)); }
};

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value) {
    const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
    const AttentionShape s(q, k);
    at::Tensor y = at::empty_like(q), probs = at::empty({s.b, s.h, s.t, s.t}, q.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *yp = y.data_ptr<float>(), *pp = probs.data_ptr<float>();
    const int64_t ldq = s.h * s.hd, ldk = s.kv * s.hd;
    at::parallel_for(0, s.b * s.h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / s.h, h = idx % s.h, g = h / s.rep();
        const float* qh = qp + b * s.t * ldq + h * s.hd;
        const float* kh = kp + b * s.t * ldk + g * s.hd;
        const float* vh = vp + b * s.t * ldk + g * s.hd;
        float* yh = yp + b * s.t * ldq + h * s.hd;
        float* p = pp + idx * s.t * s.t;
        for (int64_t r0 = 0; r0 < s.t; r0 += kRowBlock) {
          const int64_t r1 = std::min(s.t, r0 + kRowBlock), nb = r1 - r0;
          gemm(false, true, nb, r1, s.hd, s.scale(), qh + r0 * ldq, ldq, kh, ldk, 0.0f,
               p + r0 * s.t, s.t);
          causal_softmax_rows(p, s.t, r0, r1);
          gemm(false, false, nb, s.hd, r1, 1.0f, p + r0 * s.t, s.t, vh, ldk, 0.0f, yh + r0 * ldq,
               ldq);
        }
      }
    });
    ctx->save_for_backward({q, k, v, probs});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &probs = saved[3];
    const at::Tensor dy = grads[0].contiguous();
    const AttentionShape s(q, k);
    at::Tensor dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const float *pp = probs.data_ptr<float>(), *dyp = dy.data_ptr<float>();
    float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
    const int64_t ldq = s.h * s.hd, ldk = s.kv * s.hd;
    const float scale = s.scale();
    // One task per (batch, key/value head): its query heads add into dk and dv in order.
    at::parallel_for(0, s.b * s.kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> ds(static_cast<size_t>(s.t * s.t));
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / s.kv, g = idx % s.kv;
        const float* kh = kp + b * s.t * ldk + g * s.hd;
        const float* vh = vp + b * s.t * ldk + g * s.hd;
        float* dkh = dkp + b * s.t * ldk + g * s.hd;
        float* dvh = dvp + b * s.t * ldk + g * s.hd;
        for (int64_t h = g * s.rep(); h < (g + 1) * s.rep(); ++h) {
          const float* qh = qp + b * s.t * ldq + h * s.hd;
          const float* dyh = dyp + b * s.t * ldq + h * s.hd;
          float* dqh = dqp + b * s.t * ldq + h * s.hd;
          const float* p = pp + (b * s.h + h) * s.t * s.t;
          for (int64_t r0 = 0; r0 < s.t; r0 += kRowBlock) {
            const int64_t r1 = std::min(s.t, r0 + kRowBlock), nb = r1 - r0;
            float* dsb = ds.data() + r0 * s.t;
            gemm(false, true, nb, r1, s.hd, 1.0f, dyh + r0 * ldq, ldq, vh, ldk, 0.0f, dsb,
                 s.t);                                                // dP
            causal_softmax_backward_rows(p, ds.data(), s.t, r0, r1);  // dS
            gemm(true, false, r1, s.hd, nb, 1.0f, p + r0 * s.t, s.t, dyh + r0 * ldq, ldq, 1.0f, dvh,
                 ldk);
            gemm(false, false, nb, s.hd, r1, scale, dsb, s.t, kh, ldk, 0.0f, dqh + r0 * ldq, ldq);
            gemm(true, false, r1, s.hd, nb, scale, dsb, s.t, qh + r0 * ldq, ldq, 1.0f, dkh, ldk);
          }
        }
      }
    });
    return {dq, dk, dv};
  }
};

}  // namespace

bool has_blas() {
  return sgemm() != nullptr;
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (q.size(2) % k.size(2) != 0) {
    throw std::invalid_argument(
        fmt::format("causal_attention: {} query heads are not a multiple of {} key/value heads",
                    q.size(2), k.size(2)));
  }
  return AttentionFunction::apply(q, k, v)[0];
}

}  // namespace strata::fused
