// Internal to the fused kernels (fused_ops.cpp, fused_attention.cpp): the per-ISA clones
// their loops are compiled as, and a vectorisable exp().
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// Loops compiled three times (AVX-512, AVX2, baseline x86-64); the loader picks by the CPU's
// features. (Clones by "arch=" would dispatch on the CPU model and take the baseline on models
// the compiler does not know.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STRATA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STRATA_CLONES
#endif

namespace strata::fused::detail {

// Rows per block of a cross-row reduction, and per block of attention scores.
inline constexpr int64_t kRowBlock = 64;

// Branch-free, so that loops calling it vectorise: n = round(x log2 e) by adding 1.5 * 2^23 (the
// float's low bits then hold n), e^r on |r| <= ln 2 / 2 by Cephes' polynomial, 2^n from the bits.
inline __attribute__((always_inline)) float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, in two parts
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // (n + 127) in the exponent field
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace strata::fused::detail
