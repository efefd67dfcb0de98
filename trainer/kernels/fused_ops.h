// Fused CPU kernels for the Llama block, each an autograd function with a hand-written
// backward: one pass over memory where the ATen composition makes several, no intermediate
// tensors, no copies for layout. They apply to contiguous fp32 CPU tensors; anything else (GPU,
// other dtypes) takes the ATen composition in trainer/llama.cpp. Every kernel is deterministic
// and independent of the thread count: a row (or a head) is computed by one thread, and
// reductions across rows sum fixed blocks in a fixed order.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace strata::fused {

// Whether the fused kernels serve these tensors (CPU, fp32) and are switched on (the config
// key training.fused_kernels; off, the ATen composition runs: for comparisons and benchmarks).
bool enabled(const at::Tensor& t);
// Switches the fused kernels on or off for the process (the trainer sets it from its config).
void set_enabled(bool on);

// x * rsqrt(mean(x^2, -1) + eps) * weight over the last dimension.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Interleaved rotary embedding of x (B, T, heads, hd): pairs (x[2i], x[2i+1]) rotated by the
// angles in cos/sin (max_seq_len, hd/2). Output (B, T, heads, hd).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// silu(a) * b (the SwiGLU gate); or of ab (..., 2F) holding a in its first F columns and b in
// its last F (one GEMM with [w1; w3] made both).
at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b);
at::Tensor swiglu(const at::Tensor& ab);

// The fused projection qkv (B, T, (heads + 2 kv_heads) hd) = x [wq; wk; wv]^T split into q
// (B, T, heads, hd) and k (B, T, kv_heads, hd), both rotated as rope() does, and v (B, T,
// kv_heads, hd): one pass, and one pass back into a single gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv, int64_t heads,
                                                        int64_t kv_heads, const at::Tensor& cos,
                                                        const at::Tensor& sin);

// Causal softmax(q k^T / sqrt(hd)) v with q (B, T, H, hd), k and v (B, T, KV, hd) as the
// projections produce them (no transposes, GQA without expanding k and v: query head j reads
// key/value head j / (H / KV)). Output (B, T, H, hd). Only the causal half of the scores is
// computed (in row blocks); the probabilities are kept for backward, as ATen's math path does.
// Needs the process's BLAS to export sgemm_ (see has_blas); otherwise use the ATen path.
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
bool has_blas();

// Mean cross-entropy of logits (N, V) against targets (N) (int64, each in [0, V)). In training
// the gradient (softmax - one_hot) / N is formed in the same pass as the loss and the logits are
// not kept.
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets);

// One AdamW update in place (torch.optim.AdamW's arithmetic, one pass): p -= decay * mask * p
// (mask undefined: every element), exp_avg += (1 - beta1) (g - exp_avg), exp_avg_sq = beta2
// exp_avg_sq + (1 - beta2) g^2, p -= step_size exp_avg / (sqrt(exp_avg_sq) / bias2_sqrt + eps).
// All contiguous fp32 tensors of one size.
struct AdamWScalars {
  float decay, beta1, beta2, step_size, bias2_sqrt, eps;
};
void adamw_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& exp_avg_sq, const at::Tensor& decay_mask, const AdamWScalars& s);

// Sum of squares of a contiguous fp32 tensor, accumulated in fp64 over fixed blocks.
double sum_of_squares(const at::Tensor& t);

}  // namespace strata::fused
