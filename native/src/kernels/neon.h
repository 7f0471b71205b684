// AArch64 NEON kernels (baseline armv8-a: no dotprod / fp16 extensions).
#pragma once

#if defined(__aarch64__)
#define CSMD_HAVE_NEON_KERNELS 1

#include <arm_neon.h>

#include "common.h"

namespace csmd {
namespace neon {

// acc += u8[0..16) * x[0..16), four partial accumulators.
static inline void fma16_u8(uint8x16_t c, const float* x, float32x4_t* acc) {
  const uint16x8_t l = vmovl_u8(vget_low_u8(c));
  const uint16x8_t h = vmovl_u8(vget_high_u8(c));
  acc[0] = vfmaq_f32(acc[0], vcvtq_f32_u32(vmovl_u16(vget_low_u16(l))), vld1q_f32(x));
  acc[1] = vfmaq_f32(acc[1], vcvtq_f32_u32(vmovl_u16(vget_high_u16(l))), vld1q_f32(x + 4));
  acc[2] = vfmaq_f32(acc[2], vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))), vld1q_f32(x + 8));
  acc[3] = vfmaq_f32(acc[3], vcvtq_f32_u32(vmovl_u16(vget_high_u16(h))), vld1q_f32(x + 12));
}

static inline float32x4_t sum4(const float32x4_t* a) {
  return vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3]));
}

// 16-byte chunks of a 4-bit row: chunk c (bytes 16c..16c+15) has its low
// nibbles at permuted positions base + 16*(c%2) and high nibbles at
// base + 32 + 16*(c%2) for a full 32-byte block (base = 2*block start), or at
// base and base + 16 for a final 16-byte block.
static inline float dot_f(const uint8_t* w, const float* s, const float* bias,
                          const XPrep& p) {
  const int K = p.K, G = p.G, ng = K / G;
  float btot = 0.f;
  for (int g = 0; g < ng; ++g) btot += bias[g] * p.gsum[g];
  float32x4_t tot = vdupq_n_f32(0.f);
  if (p.bits == 4) {
    const int nbytes = K / 2;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    const int gb = G / 2;  // bytes per group: 16, 32 or 64
    for (int g = 0; g < ng; ++g) {
      float32x4_t a[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f),
                          vdupq_n_f32(0.f)};
      for (int j = g * gb; j < (g + 1) * gb; j += 16) {
        const int o = j & ~31;
        const int B = block4_bytes(o, nbytes);
        const int b = j - o;
        const uint8x16_t v = vld1q_u8(w + j);
        fma16_u8(vandq_u8(v, m4), p.xf + 2 * o + b, a);
        fma16_u8(vshrq_n_u8(v, 4), p.xf + 2 * o + B + b, a);
      }
      tot = vfmaq_f32(tot, sum4(a), vdupq_n_f32(s[g]));
    }
  } else {
    for (int g = 0; g < ng; ++g) {
      float32x4_t a[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f),
                          vdupq_n_f32(0.f)};
      for (int k = g * G; k < (g + 1) * G; k += 16) fma16_u8(vld1q_u8(w + k), p.xf + k, a);
      tot = vfmaq_f32(tot, sum4(a), vdupq_n_f32(s[g]));
    }
  }
  return vaddvq_f32(tot) + btot;
}

static inline float dot_i(const uint8_t* w, const float* s, const float* bias,
                          const XPrep& p) {
  const int K = p.K, G = p.G, ng = K / G;
  float btot = 0.f;
  for (int g = 0; g < ng; ++g) btot += bias[g] * p.gsum[g];
  float32x4_t tot = vdupq_n_f32(0.f);
  if (p.bits == 4) {
    const int nbytes = K / 2;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    const int gb = G / 2;
    for (int g = 0; g < ng; ++g) {
      int32x4_t acc = vdupq_n_s32(0);
      for (int j = g * gb; j < (g + 1) * gb; j += 16) {
        const int o = j & ~31;
        const int B = block4_bytes(o, nbytes);
        const int b = j - o;
        const uint8x16_t v = vld1q_u8(w + j);
        // nibbles are 0..15, so they are valid signed bytes
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        const int8x16_t xl = vld1q_s8(p.xq + 2 * o + b);
        const int8x16_t xh = vld1q_s8(p.xq + 2 * o + B + b);
        // |products| <= 15*127; two per int16 lane fit easily
        int16x8_t pr = vmull_s8(vget_low_s8(lo), vget_low_s8(xl));
        pr = vmlal_s8(pr, vget_low_s8(hi), vget_low_s8(xh));
        int16x8_t pr2 = vmull_high_s8(lo, xl);
        pr2 = vmlal_high_s8(pr2, hi, xh);
        acc = vpadalq_s16(acc, pr);
        acc = vpadalq_s16(acc, pr2);
      }
      tot = vfmaq_f32(tot, vcvtq_f32_s32(acc), vdupq_n_f32(s[g] * p.gdx[g]));
    }
  } else {
    for (int g = 0; g < ng; ++g) {
      int32x4_t acc = vdupq_n_s32(0);
      for (int k = g * G; k < (g + 1) * G; k += 16) {
        const uint8x16_t v = vld1q_u8(w + k);
        const int16x8_t ql = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(v)));
        const int16x8_t qh = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(v)));
        const int16x8_t xl = vld1q_s16(p.xq16 + k);
        const int16x8_t xh = vld1q_s16(p.xq16 + k + 8);
        acc = vmlal_s16(acc, vget_low_s16(ql), vget_low_s16(xl));
        acc = vmlal_high_s16(acc, ql, xl);
        acc = vmlal_s16(acc, vget_low_s16(qh), vget_low_s16(xh));
        acc = vmlal_high_s16(acc, qh, xh);
      }
      tot = vfmaq_f32(tot, vcvtq_f32_s32(acc), vdupq_n_f32(s[g] * p.gdx[g]));
    }
  }
  return vaddvq_f32(tot) + btot;
}

// 4 bits with int16 x (word-permuted xq16, see permute4w); 8 bits: dot_i.
// A 16-byte chunk c of a block is 8 words; nibble j of its words meets
// xq16[2o + W*j + 8*(c%2) ..] (W = 16 for a full block, 8 for a final one).
static inline float dot_i16(const uint8_t* w, const float* s, const float* bias,
                            const XPrep& p) {
  if (p.bits != 4) return dot_i(w, s, bias, p);
  const int K = p.K, G = p.G, ng = K / G, nbytes = K / 2, gb = G / 2;
  const uint16x8_t m4 = vdupq_n_u16(0x000F);
  float32x4_t tot = vdupq_n_f32(0.f), bt = vdupq_n_f32(0.f);
  int g4 = 0;
  for (; g4 + 4 <= ng; g4 += 4) bt = vfmaq_f32(bt, vld1q_f32(bias + g4), vld1q_f32(p.gsum + g4));
  float btot = vaddvq_f32(bt);
  for (; g4 < ng; ++g4) btot += bias[g4] * p.gsum[g4];
  for (int g = 0; g < ng; ++g) {
    int32x4_t a0 = vdupq_n_s32(0), a1 = vdupq_n_s32(0);
    for (int j = g * gb; j < (g + 1) * gb; j += 16) {
      const int o = j & ~31;
      const int W = block4_bytes(o, nbytes) / 2;
      const int16_t* x = p.xq16 + 2 * o + (j - o) / 2;
      const uint16x8_t v = vld1q_u16(reinterpret_cast<const uint16_t*>(w + j));
      const int16x8_t q0 = vreinterpretq_s16_u16(vandq_u16(v, m4));
      const int16x8_t q1 = vreinterpretq_s16_u16(vandq_u16(vshrq_n_u16(v, 4), m4));
      const int16x8_t q2 = vreinterpretq_s16_u16(vandq_u16(vshrq_n_u16(v, 8), m4));
      const int16x8_t q3 = vreinterpretq_s16_u16(vshrq_n_u16(v, 12));
      const int16x8_t x0 = vld1q_s16(x), x1 = vld1q_s16(x + W);
      const int16x8_t x2 = vld1q_s16(x + 2 * W), x3 = vld1q_s16(x + 3 * W);
      a0 = vmlal_s16(a0, vget_low_s16(q0), vget_low_s16(x0));
      a1 = vmlal_high_s16(a1, q0, x0);
      a0 = vmlal_s16(a0, vget_low_s16(q1), vget_low_s16(x1));
      a1 = vmlal_high_s16(a1, q1, x1);
      a0 = vmlal_s16(a0, vget_low_s16(q2), vget_low_s16(x2));
      a1 = vmlal_high_s16(a1, q2, x2);
      a0 = vmlal_s16(a0, vget_low_s16(q3), vget_low_s16(x3));
      a1 = vmlal_high_s16(a1, q3, x3);
    }
    tot = vfmaq_f32(tot, vcvtq_f32_s32(vaddq_s32(a0, a1)), vdupq_n_f32(s[g] * p.gdx[g]));
  }
  return vaddvq_f32(tot) + btot;
}

static inline void deq16(uint8x16_t c, float s, float b, float* out) {
  const float32x4_t sv = vdupq_n_f32(s), bv = vdupq_n_f32(b);
  const uint16x8_t l = vmovl_u8(vget_low_u8(c));
  const uint16x8_t h = vmovl_u8(vget_high_u8(c));
  vst1q_f32(out, vfmaq_f32(bv, vcvtq_f32_u32(vmovl_u16(vget_low_u16(l))), sv));
  vst1q_f32(out + 4, vfmaq_f32(bv, vcvtq_f32_u32(vmovl_u16(vget_high_u16(l))), sv));
  vst1q_f32(out + 8, vfmaq_f32(bv, vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))), sv));
  vst1q_f32(out + 12, vfmaq_f32(bv, vcvtq_f32_u32(vmovl_u16(vget_high_u16(h))), sv));
}

static inline void dequant(const uint8_t* w, const float* s, const float* bias,
                           int K, int G, int bits, int k0, int kn, float* out) {
  if (bits == 4) {
    const int nbytes = K / 2;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int j = k0 / 2; j < (k0 + kn) / 2; j += 16) {
      const int o = j & ~31;
      const int B = block4_bytes(o, nbytes);
      const int b = j - o;
      const int g = (2 * j) / G;
      const uint8x16_t v = vld1q_u8(w + j);
      deq16(vandq_u8(v, m4), s[g], bias[g], out + (2 * o + b - k0));
      deq16(vshrq_n_u8(v, 4), s[g], bias[g], out + (2 * o + B + b - k0));
    }
  } else {
    for (int k = k0; k < k0 + kn; k += 16) {
      const int g = k / G;
      deq16(vld1q_u8(w + k), s[g], bias[g], out + (k - k0));
    }
  }
}

static inline float dot_f32(const float* a, const float* b, int K) {
  float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f);
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    s0 = vfmaq_f32(s0, vld1q_f32(a + k), vld1q_f32(b + k));
    s1 = vfmaq_f32(s1, vld1q_f32(a + k + 4), vld1q_f32(b + k + 4));
  }
  float r = vaddvq_f32(vaddq_f32(s0, s1));
  for (; k < K; ++k) r += a[k] * b[k];
  return r;
}

// bfloat16 -> float: SHLL by 16 (the element size) widens and shifts into the upper half.
static inline float32x4_t bf16_lo(uint16x8_t h) {
  return vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
}
static inline float32x4_t bf16_hi(uint16x8_t h) {
  return vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
}

static inline float dot_bf16(const uint16_t* w, const float* x, int K) {
  float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f), s2 = vdupq_n_f32(0.f), s3 = vdupq_n_f32(0.f);
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    const uint16x8_t a = vld1q_u16(w + k), b = vld1q_u16(w + k + 8);
    s0 = vfmaq_f32(s0, bf16_lo(a), vld1q_f32(x + k));
    s1 = vfmaq_f32(s1, bf16_hi(a), vld1q_f32(x + k + 4));
    s2 = vfmaq_f32(s2, bf16_lo(b), vld1q_f32(x + k + 8));
    s3 = vfmaq_f32(s3, bf16_hi(b), vld1q_f32(x + k + 12));
  }
  for (; k + 4 <= K; k += 4)
    s0 = vfmaq_f32(s0, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + k), 16)), vld1q_f32(x + k));
  float r = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
  for (; k < K; ++k) r += bf16_to_f32(w[k]) * x[k];
  return r;
}

static inline void cvt_bf16(const uint16_t* w, int n, float* out) {
  int k = 0;
  for (; k + 8 <= n; k += 8) {
    const uint16x8_t h = vld1q_u16(w + k);
    vst1q_f32(out + k, bf16_lo(h));
    vst1q_f32(out + k + 4, bf16_hi(h));
  }
  for (; k < n; ++k) out[k] = bf16_to_f32(w[k]);
}

}  // namespace neon
}  // namespace csmd

#endif  // __aarch64__
