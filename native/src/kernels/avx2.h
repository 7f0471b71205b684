// x86-64 AVX2+FMA kernels.  Each function carries
// __attribute__((target("avx2,fma"))) so this header can be included in a
// translation unit compiled for baseline x86-64; callers must check
// __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") first.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define CSMD_HAVE_AVX2_KERNELS 1

#include <immintrin.h>

#include "common.h"

#define CSMD_AVX2 __attribute__((target("avx2,fma")))

namespace csmd {
namespace avx2 {

CSMD_AVX2 static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc += u8[0..16) * x[0..16)
CSMD_AVX2 static inline __m256 fma16_u8(__m128i c, const float* x, __m256 acc) {
  const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
  const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
  acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc);
  return _mm256_fmadd_ps(b, _mm256_loadu_ps(x + 8), acc);
}

CSMD_AVX2 static inline float dot_f(const uint8_t* w, const float* s,
                                    const float* bias, const XPrep& p) {
  const int K = p.K, G = p.G, ng = K / G;
  float btot = 0.f;
  for (int g = 0; g < ng; ++g) btot += bias[g] * p.gsum[g];
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  if (p.bits == 4) {
    const int nbytes = K / 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m128i m4s = _mm_set1_epi8(0x0F);
    if (G == 32) {
      int o = 0, g = 0;
      for (; o + 32 <= nbytes; o += 32, g += 2) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + o));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const float* x = p.xf + 2 * o;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        a = fma16_u8(_mm256_castsi256_si128(lo), x, a);
        a = fma16_u8(_mm256_castsi256_si128(hi), x + 32, a);
        b = fma16_u8(_mm256_extracti128_si256(lo, 1), x + 16, b);
        b = fma16_u8(_mm256_extracti128_si256(hi, 1), x + 48, b);
        tot0 = _mm256_fmadd_ps(a, _mm256_set1_ps(s[g]), tot0);
        tot1 = _mm256_fmadd_ps(b, _mm256_set1_ps(s[g + 1]), tot1);
      }
      if (o < nbytes) {  // final 16-byte block (one group)
        const __m128i v = _mm_loadu_si128((const __m128i*)(w + o));
        const float* x = p.xf + 2 * o;
        __m256 a = _mm256_setzero_ps();
        a = fma16_u8(_mm_and_si128(v, m4s), x, a);
        a = fma16_u8(_mm_and_si128(_mm_srli_epi16(v, 4), m4s), x + 16, a);
        tot0 = _mm256_fmadd_ps(a, _mm256_set1_ps(s[g]), tot0);
      }
    } else {
      const int gb = G / 2;  // bytes per group (32 or 64)
      for (int g = 0; g < ng; ++g) {
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        for (int o = g * gb; o < (g + 1) * gb; o += 32) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(w + o));
          const __m256i lo = _mm256_and_si256(v, m4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          const float* x = p.xf + 2 * o;
          a = fma16_u8(_mm256_castsi256_si128(lo), x, a);
          b = fma16_u8(_mm256_extracti128_si256(lo, 1), x + 16, b);
          a = fma16_u8(_mm256_castsi256_si128(hi), x + 32, a);
          b = fma16_u8(_mm256_extracti128_si256(hi, 1), x + 48, b);
        }
        tot0 = _mm256_fmadd_ps(_mm256_add_ps(a, b), _mm256_set1_ps(s[g]), tot0);
      }
    }
  } else {
    for (int g = 0; g < ng; ++g) {
      __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
      for (int k = g * G; k < (g + 1) * G; k += 16) {
        const __m128i c = _mm_loadu_si128((const __m128i*)(w + k));
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)),
                            _mm256_loadu_ps(p.xf + k), a);
        b = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))),
            _mm256_loadu_ps(p.xf + k + 8), b);
      }
      tot0 = _mm256_fmadd_ps(_mm256_add_ps(a, b), _mm256_set1_ps(s[g]), tot0);
    }
  }
  return hsum(_mm256_add_ps(tot0, tot1)) + btot;
}

CSMD_AVX2 static inline float dot_i(const uint8_t* w, const float* s,
                                    const float* bias, const XPrep& p) {
  const int K = p.K, G = p.G, ng = K / G;
  float btot = 0.f;
  for (int g = 0; g < ng; ++g) btot += bias[g] * p.gsum[g];
  __m256 tot = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  if (p.bits == 4) {
    const int nbytes = K / 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    if (G == 32) {
      int o = 0, g = 0;
      for (; o + 32 <= nbytes; o += 32, g += 2) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + o));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const int8_t* x = p.xq + 2 * o;
        const __m256i pr = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)x)),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(x + 32))));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones16));
        const __m256 sc = _mm256_set_m128(_mm_set1_ps(s[g + 1] * p.gdx[g + 1]),
                                          _mm_set1_ps(s[g] * p.gdx[g]));
        tot = _mm256_fmadd_ps(f, sc, tot);
      }
      float tail = 0.f;
      if (o < nbytes) {
        const __m128i m4s = _mm_set1_epi8(0x0F);
        const __m128i v = _mm_loadu_si128((const __m128i*)(w + o));
        const int8_t* x = p.xq + 2 * o;
        const __m128i pr = _mm_add_epi16(
            _mm_maddubs_epi16(_mm_and_si128(v, m4s), _mm_loadu_si128((const __m128i*)x)),
            _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4s),
                              _mm_loadu_si128((const __m128i*)(x + 16))));
        __m128i i = _mm_madd_epi16(pr, _mm_set1_epi16(1));
        i = _mm_add_epi32(i, _mm_shuffle_epi32(i, 0x4E));
        i = _mm_add_epi32(i, _mm_shuffle_epi32(i, 0xB1));
        tail = (s[g] * p.gdx[g]) * static_cast<float>(_mm_cvtsi128_si32(i));
      }
      return hsum(tot) + tail + btot;
    }
    const int gb = G / 2;
    for (int g = 0; g < ng; ++g) {
      __m256i acc = _mm256_setzero_si256();
      for (int o = g * gb; o < (g + 1) * gb; o += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + o));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const int8_t* x = p.xq + 2 * o;
        const __m256i pr = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)x)),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(x + 32))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pr, ones16));
      }
      tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc),
                            _mm256_set1_ps(s[g] * p.gdx[g]), tot);
    }
  } else {
    for (int g = 0; g < ng; ++g) {
      __m256i acc = _mm256_setzero_si256();
      for (int k = g * G; k < (g + 1) * G; k += 16) {
        const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + k)));
        acc = _mm256_add_epi32(
            acc, _mm256_madd_epi16(q, _mm256_loadu_si256((const __m256i*)(p.xq16 + k))));
      }
      tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc),
                            _mm256_set1_ps(s[g] * p.gdx[g]), tot);
    }
  }
  return hsum(tot) + btot;
}

CSMD_AVX2 static inline float dot_f32(const float* a, const float* b, int K) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  float r = hsum(_mm256_add_ps(s0, s1));
  for (; k < K; ++k) r += a[k] * b[k];
  return r;
}

// Integer dot of one 32-byte 4-bit block (word layout, see permute4w) with
// int16 x: 8 int32 lanes, lanes 0-3 from bytes 0-15, lanes 4-7 from 16-31.
CSMD_AVX2 static inline __m256i blk_i16(const uint8_t* w, const int16_t* x) {
  const __m256i m4 = _mm256_set1_epi16(0x000F);
  const __m256i v = _mm256_loadu_si256((const __m256i*)w);
  const __m256i q0 = _mm256_and_si256(v, m4);
  const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4);
  const __m256i q3 = _mm256_srli_epi16(v, 12);
  const __m256i a = _mm256_add_epi32(
      _mm256_madd_epi16(q0, _mm256_loadu_si256((const __m256i*)x)),
      _mm256_madd_epi16(q1, _mm256_loadu_si256((const __m256i*)(x + 16))));
  const __m256i b = _mm256_add_epi32(
      _mm256_madd_epi16(q2, _mm256_loadu_si256((const __m256i*)(x + 32))),
      _mm256_madd_epi16(q3, _mm256_loadu_si256((const __m256i*)(x + 48))));
  return _mm256_add_epi32(a, b);
}

// Same for a final 16-byte block: 4 int32 lanes.
CSMD_AVX2 static inline __m128i blk16_i16(const uint8_t* w, const int16_t* x) {
  const __m128i m4 = _mm_set1_epi16(0x000F);
  const __m128i v = _mm_loadu_si128((const __m128i*)w);
  const __m128i a = _mm_add_epi32(
      _mm_madd_epi16(_mm_and_si128(v, m4), _mm_loadu_si128((const __m128i*)x)),
      _mm_madd_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_loadu_si128((const __m128i*)(x + 8))));
  const __m128i b = _mm_add_epi32(
      _mm_madd_epi16(_mm_and_si128(_mm_srli_epi16(v, 8), m4), _mm_loadu_si128((const __m128i*)(x + 16))),
      _mm_madd_epi16(_mm_srli_epi16(v, 12), _mm_loadu_si128((const __m128i*)(x + 24))));
  return _mm_add_epi32(a, b);
}

// 4 bits, x as int16 per group (word-permuted xq16); 8 bits: dot_i.
CSMD_AVX2 static inline float dot_i16(const uint8_t* w, const float* s,
                                      const float* bias, const XPrep& p) {
  if (p.bits != 4) return dot_i(w, s, bias, p);
  const int K = p.K, G = p.G, ng = K / G, nbytes = K / 2;
  const int16_t* xq = p.xq16;
  const float* dx = p.gdx;
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  float tail = 0.f;
  if (G == 32) {  // a 32-byte block holds two groups: one per 128-bit half
    int o = 0, g = 0;
    for (; o + 64 <= nbytes; o += 64, g += 4) {
      const __m256 f0 = _mm256_cvtepi32_ps(blk_i16(w + o, xq + 2 * o));
      const __m256 f1 = _mm256_cvtepi32_ps(blk_i16(w + o + 32, xq + 2 * o + 64));
      const __m256 sc0 = _mm256_set_m128(_mm_set1_ps(s[g + 1] * dx[g + 1]), _mm_set1_ps(s[g] * dx[g]));
      const __m256 sc1 = _mm256_set_m128(_mm_set1_ps(s[g + 3] * dx[g + 3]), _mm_set1_ps(s[g + 2] * dx[g + 2]));
      tot0 = _mm256_fmadd_ps(f0, sc0, tot0);
      tot1 = _mm256_fmadd_ps(f1, sc1, tot1);
    }
    for (; o + 32 <= nbytes; o += 32, g += 2) {
      const __m256 f0 = _mm256_cvtepi32_ps(blk_i16(w + o, xq + 2 * o));
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
      const __m256 f0 = _mm256_cvtepi32_ps(blk_i16(w + 32 * g, xq + 64 * g));
      const __m256 f1 = _mm256_cvtepi32_ps(blk_i16(w + 32 * g + 32, xq + 64 * g + 64));
      tot0 = _mm256_fmadd_ps(f0, _mm256_set1_ps(s[g] * dx[g]), tot0);
      tot1 = _mm256_fmadd_ps(f1, _mm256_set1_ps(s[g + 1] * dx[g + 1]), tot1);
    }
    if (g < ng)
      tot0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(blk_i16(w + 32 * g, xq + 64 * g)),
                             _mm256_set1_ps(s[g] * dx[g]), tot0);
  } else {  // G == 128: two blocks per group
    for (int g = 0; g < ng; ++g) {
      const __m256i acc = _mm256_add_epi32(blk_i16(w + 64 * g, xq + 128 * g),
                                           blk_i16(w + 64 * g + 32, xq + 128 * g + 64));
      tot0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s[g] * dx[g]), tot0);
    }
  }
  return hsum(_mm256_add_ps(tot0, tot1)) + tail + dot_f32(bias, p.gsum, ng);
}

// out[0..16) = s * u8[0..16) + b
CSMD_AVX2 static inline void deq16(__m128i c, float s, float b, float* out) {
  const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b);
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), sv, bv));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(
      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), sv, bv));
}

CSMD_AVX2 static inline void dequant(const uint8_t* w, const float* s,
                                     const float* bias, int K, int G, int bits,
                                     int k0, int kn, float* out) {
  if (bits == 4) {
    const int nbytes = K / 2;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int o = k0 / 2; o < (k0 + kn) / 2; o += 32) {
      float* d = out + (2 * o - k0);
      const int g = (2 * o) / G;
      if (o + 32 <= nbytes) {
        const int g2 = (2 * o + 32) / G;
        const __m128i v0 = _mm_loadu_si128((const __m128i*)(w + o));
        const __m128i v1 = _mm_loadu_si128((const __m128i*)(w + o + 16));
        deq16(_mm_and_si128(v0, m4), s[g], bias[g], d);
        deq16(_mm_and_si128(v1, m4), s[g2], bias[g2], d + 16);
        deq16(_mm_and_si128(_mm_srli_epi16(v0, 4), m4), s[g], bias[g], d + 32);
        deq16(_mm_and_si128(_mm_srli_epi16(v1, 4), m4), s[g2], bias[g2], d + 48);
      } else {
        const __m128i v0 = _mm_loadu_si128((const __m128i*)(w + o));
        deq16(_mm_and_si128(v0, m4), s[g], bias[g], d);
        deq16(_mm_and_si128(_mm_srli_epi16(v0, 4), m4), s[g], bias[g], d + 16);
      }
    }
  } else {
    for (int k = k0; k < k0 + kn; k += 16) {
      const int g = k / G;
      deq16(_mm_loadu_si128((const __m128i*)(w + k)), s[g], bias[g], out + (k - k0));
    }
  }
}

// 8 bfloat16 -> 8 float: zero-extend to 32 bits and shift into the upper half.
CSMD_AVX2 static inline __m256 bf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

CSMD_AVX2 static inline float dot_bf16(const uint16_t* w, const float* x, int K) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 32 <= K; k += 32) {
    s0 = _mm256_fmadd_ps(bf16x8(w + k), _mm256_loadu_ps(x + k), s0);
    s1 = _mm256_fmadd_ps(bf16x8(w + k + 8), _mm256_loadu_ps(x + k + 8), s1);
    s2 = _mm256_fmadd_ps(bf16x8(w + k + 16), _mm256_loadu_ps(x + k + 16), s2);
    s3 = _mm256_fmadd_ps(bf16x8(w + k + 24), _mm256_loadu_ps(x + k + 24), s3);
  }
  for (; k + 8 <= K; k += 8) s0 = _mm256_fmadd_ps(bf16x8(w + k), _mm256_loadu_ps(x + k), s0);
  float r = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; k < K; ++k) r += bf16_to_f32(w[k]) * x[k];
  return r;
}

CSMD_AVX2 static inline void cvt_bf16(const uint16_t* w, int n, float* out) {
  int k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, bf16x8(w + k));
  for (; k < n; ++k) out[k] = bf16_to_f32(w[k]);
}

// Ask for the 256 bytes (four cache lines) kWeightPrefetch bytes past p: the weight rows of a matvec lie one
// after another, so this runs ahead into the next rows. The hardware prefetchers alone left the int16 4-bit
// matvec waiting on DRAM; 2 KB was the best of the distances tried (BENCHMARKS.md, "Weight prefetch 2 KB
// ahead"). A prefetch past the end of the matrix is harmless (prefetches never fault).
constexpr int kWeightPrefetch = 2048;

CSMD_AVX2 static inline void prefetch_ahead(const uint8_t* p) {
  for (int o = 0; o < 256; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kWeightPrefetch + o), _MM_HINT_T0);
}

#define CSMD_GROUP_TARGET CSMD_AVX2
#include "sum_groups_bf16.inc"
#undef CSMD_GROUP_TARGET

// 8 bits: u8 weights widened to int16 against natural-order int16 x, 64 bytes a group.
struct I16G64Bf16Bits8 {
  template <int R>
  CSMD_AVX2 static inline void run(const uint8_t* w, const uint16_t* s, const uint16_t* bias, const XPrep* const* p,
                                   float* out) {
    sum_groups_bf16<R>(w, 64, s, bias, p, out, [&](int g, __m256* dots) CSMD_AVX2 {
      const uint8_t* wg = w + 64 * g;
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wg + 16 * i)));
      for (int r = 0; r < R; ++r) {
        const int16_t* xg = p[r]->xq16 + 64 * g;
        __m256i a = _mm256_madd_epi16(q[0], _mm256_loadu_si256((const __m256i*)xg));
        for (int i = 1; i < 4; ++i)
          a = _mm256_add_epi32(a, _mm256_madd_epi16(q[i], _mm256_loadu_si256((const __m256i*)(xg + 16 * i))));
        dots[r] = _mm256_cvtepi32_ps(a);
      }
    });
  }
};

// 4 bits (word layout, int16 x): the four nibbles of each 16-bit word against four 16-value runs of x.
struct I16G64Bf16Bits4 {
  template <int R>
  CSMD_AVX2 static inline void run(const uint8_t* w, const uint16_t* s, const uint16_t* bias, const XPrep* const* p,
                                   float* out) {
    const __m256i m4 = _mm256_set1_epi16(0x000F);
    sum_groups_bf16<R>(w, 32, s, bias, p, out, [&](int g, __m256* dots) CSMD_AVX2 {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * g));
      const __m256i q0 = _mm256_and_si256(v, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4), q3 = _mm256_srli_epi16(v, 12);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = p[r]->xq16 + 64 * g;
        const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_loadu_si256((const __m256i*)x)),
                                           _mm256_madd_epi16(q1, _mm256_loadu_si256((const __m256i*)(x + 16))));
        const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(q2, _mm256_loadu_si256((const __m256i*)(x + 32))),
                                           _mm256_madd_epi16(q3, _mm256_loadu_si256((const __m256i*)(x + 48))));
        dots[r] = _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
      }
    });
  }
};

// The "int8" mode at 4 bits: unsigned nibbles times int8 x (permute4 order) with vpmaddubsw, whose int16 pair
// sums (at most 2 * 15 * 127 each, and x never -128) are added for both nibbles and widened to int32 with
// vpmaddwd. Same integer sums as dot_i.
struct I8G64Bf16Bits4 {
  template <int R>
  CSMD_AVX2 static inline void run(const uint8_t* w, const uint16_t* s, const uint16_t* bias, const XPrep* const* p,
                                   float* out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    sum_groups_bf16<R>(w, 32, s, bias, p, out, [&](int g, __m256* dots) CSMD_AVX2 {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * g));
      const __m256i lo_w = _mm256_and_si256(v, m4), hi_w = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      for (int r = 0; r < R; ++r) {
        const int8_t* xg = p[r]->xq + 64 * g;
        const __m256i lo = _mm256_maddubs_epi16(lo_w, _mm256_loadu_si256((const __m256i*)xg));
        const __m256i hi = _mm256_maddubs_epi16(hi_w, _mm256_loadu_si256((const __m256i*)(xg + 32)));
        dots[r] = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones));
      }
    });
  }
};

// A kernel for one row of x: its R = 1 case.
template <class Kernel>
CSMD_AVX2 static inline float one_row_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                           const XPrep& p) {
  const XPrep* rows[1] = {&p};
  float out;
  Kernel::template run<1>(w, s, bias, rows, &out);
  return out;
}

CSMD_AVX2 static inline float dot_i16_g64_bf16_8bit(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                                    const XPrep& p) {
  return one_row_bf16<I16G64Bf16Bits8>(w, s, bias, p);
}

// dot_i16 for groups of 64 with bf16 scales and biases in place: 4 bits (word layout, int16 x) or 8 bits.
// Same integer sums as dot_i16; the float ones in another order.
CSMD_AVX2 static inline float dot_i16_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                               const XPrep& p) {
  if (p.bits == 8) return dot_i16_g64_bf16_8bit(w, s, bias, p);
  return one_row_bf16<I16G64Bf16Bits4>(w, s, bias, p);
}

// The "int8" mode's 4-bit matvec for groups of 64 with bf16 scales and biases in place (8 bits: int16 x in
// both modes).
CSMD_AVX2 static inline float dot_i8_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                              const XPrep& p) {
  if (p.bits != 4) return dot_i16_g64_bf16_8bit(w, s, bias, p);
  return one_row_bf16<I8G64Bf16Bits4>(w, s, bias, p);
}

// The same for `count` rows of x at once (p[r] prepared for row r): out[r] is bit for bit the one-row result.
CSMD_AVX2 static inline void dots_i16_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                               const XPrep* const* p, int count, float* out) {
  if (p[0]->bits == 8)
    rows_bf16<I16G64Bf16Bits8>(w, s, bias, p, count, out);
  else
    rows_bf16<I16G64Bf16Bits4>(w, s, bias, p, count, out);
}

CSMD_AVX2 static inline void dots_i8_g64_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* bias,
                                              const XPrep* const* p, int count, float* out) {
  if (p[0]->bits != 4)
    rows_bf16<I16G64Bf16Bits8>(w, s, bias, p, count, out);
  else
    rows_bf16<I8G64Bf16Bits4>(w, s, bias, p, count, out);
}

// Per group of 64 x: max |x| and the sum (in double, as prep_gsum).
CSMD_AVX2 static inline void group_absmax_sum(const float* xg, float& amax, float& sum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_setzero_ps();
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (int i = 0; i < 64; i += 8) {
    const __m256 v = _mm256_loadu_ps(xg + i);
    m = _mm256_max_ps(m, _mm256_and_ps(v, absmask));
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  amax = _mm_cvtss_f32(m4);
  const __m256d d = _mm256_add_pd(s0, s1);
  __m128d d2 = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  d2 = _mm_add_sd(d2, _mm_unpackhi_pd(d2, d2));
  sum = static_cast<float>(_mm_cvtsd_f64(d2));
}

// The SIMD preps' per-group start: the group's sum (into gsum) and step dx = max|x| / qmax (into gdx);
// returns 1 / dx in every lane (0 for an all-zero group).
CSMD_AVX2 static inline __m128 group_step(const float* xg, float qmax, float& gsum, float& gdx) {
  float amax;
  group_absmax_sum(xg, amax, gsum);
  gdx = amax / qmax;
  return _mm_set1_ps(gdx > 0.f ? 1.f / gdx : 0.f);
}

// MatvecPrep's x for the int16 matvecs in groups of 64 (prep_gsum and prep_x_i16_4 or prep_x_int in one
// pass, same integers): per group the step dx = max|x| / 32767, x / dx rounded to nearest even, for 4 bits
// (permute) in permute4w's order (a 64-element block is a 16x4 matrix to transpose), and the group's sum.
// One SIMD pass because the prep runs on the caller while the pool's threads wait for it (the scalar loops
// were a visible share of a step: BENCHMARKS.md, "Next session").
CSMD_AVX2 static inline void prep_i16_g64(const float* x, int K, bool permute, int16_t* q16, float* gdx,
                                         float* gsum) {
  const __m128 lim = _mm_set1_ps(32767.f), nlim = _mm_set1_ps(-32767.f);
  for (int g = 0; g < K / 64; ++g) {
    const float* xg = x + 64 * g;
    const __m128 inv = group_step(xg, 32767.f, gsum[g], gdx[g]);
    int16_t* qg = q16 + 64 * g;
    if (!permute) {
      for (int i = 0; i < 64; i += 4) {
        const __m128 v = _mm_mul_ps(_mm_loadu_ps(xg + i), inv);
        const __m128i q = _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(v, nlim), lim));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qg + i), _mm_packs_epi32(q, q));
      }
      continue;
    }
    for (int b = 0; b < 4; ++b) {  // elements 16b + 4t + j (t, j < 4) go to 16j + 4b + t
      __m128 r[4] = {_mm_loadu_ps(xg + 16 * b), _mm_loadu_ps(xg + 16 * b + 4), _mm_loadu_ps(xg + 16 * b + 8),
                     _mm_loadu_ps(xg + 16 * b + 12)};
      _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
      for (int j = 0; j < 4; ++j) {
        const __m128i q = _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(r[j], inv), nlim), lim));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qg + 16 * j + 4 * b), _mm_packs_epi32(q, q));
      }
    }
  }
}

// The int8 mode's x for 4 bits in groups of 64 (prep_gsum and prep_x_int in one pass, same integers): per
// group dx = max|x| / 127, x / dx rounded to nearest even, in permute4's order (even elements of the
// 64-element block, then odd ones), and the group's sum.
CSMD_AVX2 static inline void prep_i8_g64(const float* x, int K, int8_t* q8, float* gdx, float* gsum) {
  const __m128 lim = _mm_set1_ps(127.f), nlim = _mm_set1_ps(-127.f);
  for (int g = 0; g < K / 64; ++g) {
    const float* xg = x + 64 * g;
    const __m128 inv = group_step(xg, 127.f, gsum[g], gdx[g]);
    alignas(16) int32_t q[64];
    for (int i = 0; i < 64; i += 4)
      _mm_store_si128(reinterpret_cast<__m128i*>(q + i),
                      _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_loadu_ps(xg + i), inv), nlim), lim)));
    int8_t* qg = q8 + 64 * g;
    for (int b = 0; b < 32; ++b) {
      qg[b] = static_cast<int8_t>(q[2 * b]);
      qg[32 + b] = static_cast<int8_t>(q[2 * b + 1]);
    }
  }
}

}  // namespace avx2
}  // namespace csmd

#endif  // x86-64
