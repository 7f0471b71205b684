// x86-64 with AVX-512 VNNI (and VL): the int16 matvec with vpdpwssd, which multiplies int16 pairs and adds
// them into int32 lanes in one instruction, where AVX2 needs vpmaddwd plus vpaddd. The 256-bit (VL) forms
// are used: same layouts and results as avx2::dot_i16, one instruction fewer per 16 weights. Everything
// else in this variant is the AVX2 code. Callers must check cpu_has_avx512vnni() first.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define CSMD_HAVE_AVX512VNNI_KERNELS 1

#include <immintrin.h>

#include "avx2.h"
#include "common.h"

#define CSMD_VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512vnni")))

namespace csmd {
namespace avx512vnni {

// acc + the integer dot of one 32-byte 4-bit block (word layout, see permute4w) with int16 x: lanes 0-3
// from bytes 0-15, lanes 4-7 from bytes 16-31.
CSMD_VNNI static inline __m256i blk_i16(__m256i acc, const uint8_t* w, const int16_t* x) {
  const __m256i m4 = _mm256_set1_epi16(0x000F);
  const __m256i v = _mm256_loadu_si256((const __m256i*)w);
  acc = _mm256_dpwssd_epi32(acc, _mm256_and_si256(v, m4), _mm256_loadu_si256((const __m256i*)x));
  acc = _mm256_dpwssd_epi32(acc, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                            _mm256_loadu_si256((const __m256i*)(x + 16)));
  acc = _mm256_dpwssd_epi32(acc, _mm256_and_si256(_mm256_srli_epi16(v, 8), m4),
                            _mm256_loadu_si256((const __m256i*)(x + 32)));
  return _mm256_dpwssd_epi32(acc, _mm256_srli_epi16(v, 12), _mm256_loadu_si256((const __m256i*)(x + 48)));
}

// Same for a final 16-byte block: 4 int32 lanes.
CSMD_VNNI static inline __m128i blk16_i16(const uint8_t* w, const int16_t* x) {
  const __m128i m4 = _mm_set1_epi16(0x000F);
  const __m128i v = _mm_loadu_si128((const __m128i*)w);
  __m128i acc = _mm_dpwssd_epi32(_mm_setzero_si128(), _mm_and_si128(v, m4), _mm_loadu_si128((const __m128i*)x));
  acc = _mm_dpwssd_epi32(acc, _mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_loadu_si128((const __m128i*)(x + 8)));
  acc = _mm_dpwssd_epi32(acc, _mm_and_si128(_mm_srli_epi16(v, 8), m4), _mm_loadu_si128((const __m128i*)(x + 16)));
  return _mm_dpwssd_epi32(acc, _mm_srli_epi16(v, 12), _mm_loadu_si128((const __m128i*)(x + 24)));
}

// 8 bits: u8 weights widened to int16 against natural-order int16 x, G a multiple of 16.
CSMD_VNNI static inline float dot_i16_8bit(const uint8_t* w, const float* s, const float* bias, const XPrep& p) {
  const int K = p.K, G = p.G, ng = K / G;
  __m256 tot = _mm256_setzero_ps();
  for (int g = 0; g < ng; ++g) {
    __m256i acc = _mm256_setzero_si256();
    for (int k = g * G; k < (g + 1) * G; k += 16) {
      const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + k)));
      acc = _mm256_dpwssd_epi32(acc, q, _mm256_loadu_si256((const __m256i*)(p.xq16 + k)));
    }
    tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s[g] * p.gdx[g]), tot);
  }
  return avx2::hsum(tot) + avx2::dot_f32(bias, p.gsum, ng);
}

// Drop-in for avx2::dot_i16 (same XPrep, same integer sums).
CSMD_VNNI static inline float dot_i16(const uint8_t* w, const float* s, const float* bias, const XPrep& p) {
  if (p.bits != 4) return dot_i16_8bit(w, s, bias, p);
  const int K = p.K, G = p.G, ng = K / G, nbytes = K / 2;
  const int16_t* xq = p.xq16;
  const float* dx = p.gdx;
  const __m256i zero = _mm256_setzero_si256();
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  float tail = 0.f;
  if (G == 32) {  // a 32-byte block holds two groups: one per 128-bit half
    int o = 0, g = 0;
    for (; o + 64 <= nbytes; o += 64, g += 4) {
      const __m256 f0 = _mm256_cvtepi32_ps(blk_i16(zero, w + o, xq + 2 * o));
      const __m256 f1 = _mm256_cvtepi32_ps(blk_i16(zero, w + o + 32, xq + 2 * o + 64));
      const __m256 sc0 = _mm256_set_m128(_mm_set1_ps(s[g + 1] * dx[g + 1]), _mm_set1_ps(s[g] * dx[g]));
      const __m256 sc1 = _mm256_set_m128(_mm_set1_ps(s[g + 3] * dx[g + 3]), _mm_set1_ps(s[g + 2] * dx[g + 2]));
      tot0 = _mm256_fmadd_ps(f0, sc0, tot0);
      tot1 = _mm256_fmadd_ps(f1, sc1, tot1);
    }
    for (; o + 32 <= nbytes; o += 32, g += 2) {
      const __m256 f0 = _mm256_cvtepi32_ps(blk_i16(zero, w + o, xq + 2 * o));
      const __m256 sc0 = _mm256_set_m128(_mm_set1_ps(s[g + 1] * dx[g + 1]), _mm_set1_ps(s[g] * dx[g]));
      tot0 = _mm256_fmadd_ps(f0, sc0, tot0);
    }
    if (o < nbytes) {
      __m128i i = blk16_i16(w + o, xq + 2 * o);
      i = _mm_add_epi32(i, _mm_shuffle_epi32(i, 0x4E));
      i = _mm_add_epi32(i, _mm_shuffle_epi32(i, 0xB1));
      tail = (s[g] * dx[g]) * static_cast<float>(_mm_cvtsi128_si32(i));
    }
  } else if (G == 64) {  // one block per group
    int g = 0;
    for (; g + 2 <= ng; g += 2) {
      const __m256 f0 = _mm256_cvtepi32_ps(blk_i16(zero, w + 32 * g, xq + 64 * g));
      const __m256 f1 = _mm256_cvtepi32_ps(blk_i16(zero, w + 32 * g + 32, xq + 64 * g + 64));
      tot0 = _mm256_fmadd_ps(f0, _mm256_set1_ps(s[g] * dx[g]), tot0);
      tot1 = _mm256_fmadd_ps(f1, _mm256_set1_ps(s[g + 1] * dx[g + 1]), tot1);
    }
    if (g < ng)
      tot0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(blk_i16(zero, w + 32 * g, xq + 64 * g)),
                             _mm256_set1_ps(s[g] * dx[g]), tot0);
  } else {  // G == 128: two blocks per group, summed in the same int32 lanes
    for (int g = 0; g < ng; ++g) {
      const __m256i acc = blk_i16(blk_i16(zero, w + 64 * g, xq + 128 * g), w + 64 * g + 32, xq + 128 * g + 64);
      tot0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s[g] * dx[g]), tot0);
    }
  }
  return avx2::hsum(_mm256_add_ps(tot0, tot1)) + tail + avx2::dot_f32(bias, p.gsum, ng);
}


// The "int8" matvec mode: 4-bit weights against int8 x (permute4 order), vpdpbusd (unsigned nibbles times
// signed bytes, four products into each int32 lane). Same integer sums as avx2::dot_i; 8 bits: avx2::dot_i.
CSMD_VNNI static inline float dot_i(const uint8_t* w, const float* s, const float* bias, const XPrep& p) {
  if (p.bits != 4) return avx2::dot_i(w, s, bias, p);
  const int K = p.K, G = p.G, ng = K / G, nbytes = K / 2;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  const int8_t* xq = p.xq;
  const float* dx = p.gdx;
  // acc + one 32-byte block starting at byte o: lanes 0-3 from bytes 0-15, lanes 4-7 from bytes 16-31.
  auto block = [&](__m256i acc, int o) CSMD_VNNI {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + o));
    acc = _mm256_dpbusd_epi32(acc, _mm256_and_si256(v, m4), _mm256_loadu_si256((const __m256i*)(xq + 2 * o)));
    return _mm256_dpbusd_epi32(acc, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                               _mm256_loadu_si256((const __m256i*)(xq + 2 * o + 32)));
  };
  __m256 tot = _mm256_setzero_ps();
  float tail = 0.f;
  if (G == 32) {  // a 32-byte block holds two groups: one per 128-bit half
    int o = 0, g = 0;
    for (; o + 32 <= nbytes; o += 32, g += 2) {
      const __m256 sc = _mm256_set_m128(_mm_set1_ps(s[g + 1] * dx[g + 1]), _mm_set1_ps(s[g] * dx[g]));
      tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block(zero, o)), sc, tot);
    }
    if (o < nbytes) {  // final 16-byte block (one group)
      const __m128i m4s = _mm_set1_epi8(0x0F);
      const __m128i v = _mm_loadu_si128((const __m128i*)(w + o));
      __m128i i = _mm_dpbusd_epi32(_mm_setzero_si128(), _mm_and_si128(v, m4s), _mm_loadu_si128((const __m128i*)(xq + 2 * o)));
      i = _mm_dpbusd_epi32(i, _mm_and_si128(_mm_srli_epi16(v, 4), m4s), _mm_loadu_si128((const __m128i*)(xq + 2 * o + 16)));
      i = _mm_add_epi32(i, _mm_shuffle_epi32(i, 0x4E));
      i = _mm_add_epi32(i, _mm_shuffle_epi32(i, 0xB1));
      tail = (s[g] * dx[g]) * static_cast<float>(_mm_cvtsi128_si32(i));
    }
  } else {  // G = 64 or 128: one or two blocks per group
    const int gb = G / 2;
    for (int g = 0; g < ng; ++g) {
      __m256i acc = zero;
      for (int o = g * gb; o < (g + 1) * gb; o += 32) acc = block(acc, o);
      tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s[g] * dx[g]), tot);
    }
  }
  return avx2::hsum(tot) + tail + avx2::dot_f32(bias, p.gsum, ng);
}

#define CSMD_GROUP_TARGET CSMD_VNNI
#include "sum_groups_bf16.inc"
#undef CSMD_GROUP_TARGET

// avx2::I16G64Bf16Bits4 with vpdpwssd: the four nibbles of each word against four 16-value runs of int16 x.
struct I16G64Bf16Bits4 {
  template <int R>
  CSMD_VNNI static inline void run(const uint8_t* w, const uint16_t* s, const uint16_t* bias, const XPrep* const* p,
                                   float* out) {
    const __m256i m4 = _mm256_set1_epi16(0x000F);
    const __m256i zero = _mm256_setzero_si256();
    sum_groups_bf16<R>(w, 32, s, bias, p, out, [&](int g, __m256* dots) CSMD_VNNI {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * g));
      const __m256i q0 = _mm256_and_si256(v, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4), q3 = _mm256_srli_epi16(v, 12);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = p[r]->xq16 + 64 * g;
        __m256i acc = _mm256_dpwssd_epi32(zero, q0, _mm256_loadu_si256((const __m256i*)x));
        acc = _mm256_dpwssd_epi32(acc, q1, _mm256_loadu_si256((const __m256i*)(x + 16)));
        acc = _mm256_dpwssd_epi32(acc, q2, _mm256_loadu_si256((const __m256i*)(x + 32)));
        dots[r] = _mm256_cvtepi32_ps(_mm256_dpwssd_epi32(acc, q3, _mm256_loadu_si256((const __m256i*)(x + 48))));
      }
    });
  }
};

// The "int8" mode's 4-bit groups of 64: unsigned nibbles times int8 x (permute4 order) with vpdpbusd. Same
// integer sums as dot_i.
struct I8G64Bf16Bits4 {
  template <int R>
  CSMD_VNNI static inline void run(const uint8_t* w, const uint16_t* s, const uint16_t* bias, const XPrep* const* p,
                                   float* out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    sum_groups_bf16<R>(w, 32, s, bias, p, out, [&](int g, __m256* dots) CSMD_VNNI {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * g));
      const __m256i lo_w = _mm256_and_si256(v, m4), hi_w = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      for (int r = 0; r < R; ++r) {
        const int8_t* xg = p[r]->xq + 64 * g;
        const __m256i a = _mm256_dpbusd_epi32(zero, lo_w, _mm256_loadu_si256((const __m256i*)xg));
        dots[r] = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(a, hi_w, _mm256_loadu_si256((const __m256i*)(xg + 32))));
      }
    });
  }
};

// avx2::dot_i16_g64_bf16 with vpdpwssd for 4 bits.
CSMD_VNNI static inline float dot_i16_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                               const XPrep& p) {
  if (p.bits == 8) return avx2::dot_i16_g64_bf16_8bit(w, s, bias, p);
  const XPrep* rows[1] = {&p};
  float out;
  I16G64Bf16Bits4::run<1>(w, s, bias, rows, &out);
  return out;
}

// The "int8" mode's 4-bit matvec for groups of 64 with bf16 scales and biases in place (8 bits: int16 x in
// both modes).
CSMD_VNNI static inline float dot_i8_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                              const XPrep& p) {
  if (p.bits != 4) return avx2::dot_i16_g64_bf16_8bit(w, s, bias, p);
  const XPrep* rows[1] = {&p};
  float out;
  I8G64Bf16Bits4::run<1>(w, s, bias, rows, &out);
  return out;
}

// The same for `count` rows of x at once (p[r] prepared for row r): out[r] is bit for bit the one-row result.
CSMD_VNNI static inline void dots_i16_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                               const XPrep* const* p, int count, float* out) {
  if (p[0]->bits == 8)
    avx2::dots_i16_g64_bf16(w, s, bias, p, count, out);
  else
    rows_bf16<I16G64Bf16Bits4>(w, s, bias, p, count, out);
}

CSMD_VNNI static inline void dots_i8_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                              const XPrep* const* p, int count, float* out) {
  if (p[0]->bits != 4)
    avx2::dots_i16_g64_bf16(w, s, bias, p, count, out);
  else
    rows_bf16<I8G64Bf16Bits4>(w, s, bias, p, count, out);
}

}  // namespace avx512vnni
}  // namespace csmd

#endif  // x86-64
