// The few places where Debian's LibTorch 1.13 (CPU machines) and a CUDA LibTorch 2.x (GPU
// machines) differ. Everything version-dependent goes through here.
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

namespace strata::compat {

inline constexpr bool kHasFusedAttention = TORCH_VERSION_MAJOR >= 2;

// Causal self-attention over (B, H, T, hd) tensors with H already expanded for GQA.
inline at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/true);
#else
  const int64_t seq_len = q.size(-2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)).mul_(scale);  // (B, H, T, T)
  at::Tensor future = at::ones({seq_len, seq_len}, q.options().dtype(at::kBool)).triu_(1);
  scores.masked_fill_(future, -std::numeric_limits<float>::infinity());
  return at::matmul(at::softmax(scores, -1), v);  // (B, H, T, hd)
#endif
}

}  // namespace strata::compat
