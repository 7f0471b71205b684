// Portable scalar reference kernels (always compiled).  See common.h for the
// data layouts.  Every SIMD variant must match these up to float rounding.
#pragma once

#include "common.h"

namespace csmd {
namespace scalar {

// Quantized element at natural index e of a 4-bit row, and its position in the
// permuted order.
inline void q4_at(const uint8_t* w, int nbytes, int j, int& q_lo, int& q_hi,
                  int& p_lo, int& p_hi) {
  const int o = j & ~31;
  const int B = block4_bytes(o, nbytes);
  const int b = j - o;
  q_lo = w[j] & 15;
  q_hi = w[j] >> 4;
  p_lo = 2 * o + b;
  p_hi = 2 * o + B + b;
}

// y = sum_k (s*q+b) * x, exact float arithmetic (fp32 accumulation per group).
inline float dot_f(const uint8_t* w, const float* s, const float* bias,
                   const XPrep& p) {
  const int ng = p.K / p.G;
  float tot = 0.f;
  if (p.bits == 4) {
    const int nbytes = p.K / 2;
    for (int g = 0; g < ng; ++g) {
      float acc = 0.f;
      for (int j = g * p.G / 2; j < (g + 1) * p.G / 2; ++j) {
        int ql, qh, pl, ph;
        q4_at(w, nbytes, j, ql, qh, pl, ph);
        acc += ql * p.xf[pl] + qh * p.xf[ph];
      }
      tot += s[g] * acc + bias[g] * p.gsum[g];
    }
  } else {
    for (int g = 0; g < ng; ++g) {
      float acc = 0.f;
      for (int k = g * p.G; k < (g + 1) * p.G; ++k) acc += w[k] * p.xf[k];
      tot += s[g] * acc + bias[g] * p.gsum[g];
    }
  }
  return tot;
}

// Same with x quantized to int8 per group (integer dot products).
inline float dot_i(const uint8_t* w, const float* s, const float* bias,
                   const XPrep& p) {
  const int ng = p.K / p.G;
  float tot = 0.f;
  if (p.bits == 4) {
    const int nbytes = p.K / 2;
    for (int g = 0; g < ng; ++g) {
      int32_t acc = 0;
      for (int j = g * p.G / 2; j < (g + 1) * p.G / 2; ++j) {
        int ql, qh, pl, ph;
        q4_at(w, nbytes, j, ql, qh, pl, ph);
        acc += ql * p.xq[pl] + qh * p.xq[ph];
      }
      tot += (s[g] * p.gdx[g]) * static_cast<float>(acc) + bias[g] * p.gsum[g];
    }
  } else {
    for (int g = 0; g < ng; ++g) {
      int32_t acc = 0;
      for (int k = g * p.G; k < (g + 1) * p.G; ++k) acc += w[k] * p.xq16[k];
      tot += (s[g] * p.gdx[g]) * static_cast<float>(acc) + bias[g] * p.gsum[g];
    }
  }
  return tot;
}

// Position of the low/high nibble of byte j of a 4-bit row in the word
// permutation (permute4w).
inline void q4w_pos(int nbytes, int j, int& p_lo, int& p_hi) {
  const int o = j & ~31;
  const int W = block4_bytes(o, nbytes) / 2;
  const int i = (j - o) >> 1;
  const int n = 2 * ((j - o) & 1);  // nibble index of the low nibble in its word
  p_lo = 2 * o + W * n + i;
  p_hi = 2 * o + W * (n + 1) + i;
}

// 4 bits with x quantized per group to int16 (word-permuted xq16); 8 bits:
// same as dot_i (which already uses int16 x).
inline float dot_i16(const uint8_t* w, const float* s, const float* bias,
                     const XPrep& p) {
  if (p.bits != 4) return dot_i(w, s, bias, p);
  const int ng = p.K / p.G, nbytes = p.K / 2;
  float tot = 0.f;
  for (int g = 0; g < ng; ++g) {
    int32_t acc = 0;
    for (int j = g * p.G / 2; j < (g + 1) * p.G / 2; ++j) {
      int pl, ph;
      q4w_pos(nbytes, j, pl, ph);
      acc += (w[j] & 15) * p.xq16[pl] + (w[j] >> 4) * p.xq16[ph];
    }
    tot += (s[g] * p.gdx[g]) * static_cast<float>(acc) + bias[g] * p.gsum[g];
  }
  return tot;
}

// Dequantize elements [k0, k0+kn) of a row (permuted order for 4 bits) into
// out[0..kn).  k0 and kn are multiples of 64 (kn may end at K).
inline void dequant(const uint8_t* w, const float* s, const float* bias, int K,
                    int G, int bits, int k0, int kn, float* out) {
  if (bits == 4) {
    const int nbytes = K / 2;
    for (int j = k0 / 2; j < (k0 + kn) / 2; ++j) {
      int ql, qh, pl, ph;
      q4_at(w, nbytes, j, ql, qh, pl, ph);
      const int g = (2 * j) / G;
      out[pl - k0] = s[g] * ql + bias[g];
      out[ph - k0] = s[g] * qh + bias[g];
    }
  } else {
    for (int k = k0; k < k0 + kn; ++k) {
      const int g = k / G;
      out[k - k0] = s[g] * w[k] + bias[g];
    }
  }
}

// Plain fp32 dot product.
inline float dot_f32(const float* a, const float* b, int K) {
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += a[k] * b[k];
  return acc;
}

// fp32 dot product of a bfloat16 row w[0..K) with float x (any K).
inline float dot_bf16(const uint16_t* w, const float* x, int K) {
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += bf16_to_f32(w[k]) * x[k];
  return acc;
}

// out[0..n) = float(w[0..n)) for bfloat16 w (any n).
inline void cvt_bf16(const uint16_t* w, int n, float* out) {
  for (int k = 0; k < n; ++k) out[k] = bf16_to_f32(w[k]);
}

}  // namespace scalar
}  // namespace csmd
