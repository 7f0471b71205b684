// x86-64 with AVX-512 BF16: the pieces of the bf16 prefill GEMM (gemm_bf16.h). vdpbf16ps multiplies 16 pairs
// of bf16 values with 16 other pairs and adds each pair's two products into one fp32 lane: 32 multiply-adds
// per instruction, twice what an fp32 FMA does in the same time. Everything else of the avx512vnni variant is
// the AVX2 / VNNI code; this file only serves many-row products. Callers must check cpu_has_avx512bf16() first.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define CSMD_HAVE_AVX512BF16_KERNELS 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm_bf16.h"

#define CSMD_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// GCC 12 reports the self-initialised placeholder inside its own AVX-512 intrinsics (_mm512_undefined_*) as
// uninitialised when they are compiled through a target attribute (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace csmd {
namespace avx512bf16 {

// The mask of the first n (0..16) lanes.
CSMD_BF16 static inline __mmask16 first_lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n < 0 ? 0 : n)) - 1);
}

// 32 floats (fewer at the end of a row: `n` of them, the rest zero) as 16 bf16 pair words, rounded to nearest
// even: word i holds x[2i] in its low half and x[2i + 1] in its high half.
CSMD_BF16 static inline __m512i pairs_of(const float* x, int n) {
  const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(n), x);
  const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(n - 16), x + 16);
  // cvtne2ps(a, b) puts b's 16 values in the low half and a's in the high half: x[0..32) in order.
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// gemm_bf16.h's x layout, for the tiles [t0, t1): each row converted to pairs, then its pairs spread over the
// tile's k-major blocks (stride MR).
CSMD_BF16 static inline void pack_x(const float* x, int M, int K, int t0, int t1, uint32_t* xp) {
  const size_t Mp = static_cast<size_t>(bf16_padded_rows(M));
  const int Kp = (K + 1) / 2;
  std::vector<uint32_t> row(static_cast<size_t>(Kp) + 16);  // + 16: the last store of pairs_of is whole
  uint32_t* pairs = row.data();
  for (int t = t0; t < t1; ++t)
    for (int i = 0; i < kBf16MR; ++i) {
      const int m = t * kBf16MR + i;
      if (m < M) {
        const float* src = x + static_cast<size_t>(m) * K;
        for (int k = 0; k < K; k += 32) _mm512_storeu_si512(pairs + k / 2, pairs_of(src + k, K - k));
      } else {
        std::memset(pairs, 0, sizeof(uint32_t) * Kp);
      }
      for (int k0 = 0; k0 < K; k0 += kBf16KC) {
        const int kcp = (std::min(kBf16KC, K - k0) + 1) / 2;
        uint32_t* dst = xp + Mp * static_cast<size_t>(k0 / 2) + static_cast<size_t>(t) * kcp * kBf16MR + i;
        const uint32_t* src = pairs + k0 / 2;
        for (int p = 0; p < kcp; ++p) dst[p * kBf16MR] = src[p];
      }
    }
}

// Transpose a 16 x 16 block of 32-bit words: rows src[r * lds + 0..16) -> dst[c * ldd + r].
CSMD_BF16 static inline void transpose16(const uint32_t* src, int lds, uint32_t* dst, int ldd) {
  __m512i r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + static_cast<size_t>(i) * lds);
  // 1: interleave 32-bit words of row pairs; 2: 64-bit words of pairs of those; 3 and 4: 128-bit lanes.
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now r[4a + b] holds, in its 128-bit lane l, column 4l + b of rows 4a..4a+3; output row 4l + b is lane l of
  // r[b], r[4 + b], r[8 + b] and r[12 + b], gathered in two rounds of lane shuffles.
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);        // lanes 0, 2 of r[i], then of r[i + 4]
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);    // lanes 1, 3
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + static_cast<size_t>(i) * ldd, r[i]);
}

// gemm_bf16.h's weight panels from rows of pair words: full 16 x 16 blocks by register transposes, the edges
// (rows past nrows zero) word by word.
CSMD_BF16 static inline void pack_w(const uint32_t* rows, int ldr, int nrows, int kcp, uint32_t* wp) {
  for (int q = 0; q * kBf16NR < nrows; ++q) {
    const int nr = std::min(kBf16NR, nrows - q * kBf16NR);
    uint32_t* panel = wp + static_cast<size_t>(q) * kcp * kBf16NR;
    const uint32_t* src = rows + static_cast<size_t>(q) * kBf16NR * ldr;
    const int full_rows = nr / 16 * 16, full_pairs = kcp / 16 * 16;
    for (int j = 0; j < full_rows; j += 16)
      for (int p = 0; p < full_pairs; p += 16)
        transpose16(src + static_cast<size_t>(j) * ldr + p, ldr, panel + static_cast<size_t>(p) * kBf16NR + j, kBf16NR);
    for (int p = 0; p < kcp; ++p) {
      uint32_t* d = panel + static_cast<size_t>(p) * kBf16NR;
      const int j_start = p < full_pairs ? full_rows : 0;  // what the transposes left
      for (int j = j_start; j < kBf16NR; ++j) d[j] = j < nr ? src[static_cast<size_t>(j) * ldr + p] : 0u;
    }
  }
}

// out[r][..] += (or =) the tile's accumulators; nr columns of the 16 * NV, mr rows of the MR.
template <int MR, int NV>
CSMD_BF16 static inline void store_tile(const __m512 (&c)[MR][NV], float* C, int ldc, int mr, int nr,
                                        bool accumulate) {
  __mmask16 mask[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) mask[v] = first_lanes(nr - 16 * v);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i >= mr) break;
    float* o = C + static_cast<size_t>(i) * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      __m512 r = c[i][v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask[v], o + 16 * v));
      _mm512_mask_storeu_ps(o + 16 * v, mask[v], r);
    }
  }
}

// The micro-kernel: MR rows of x by 16 * NV weight rows, one pair of k per step (x pairs broadcast, weight
// pairs loaded as NV vectors). The accumulators are indexed by constants only (every loop unrolled), so they
// stay in registers.
template <int MR, int NV>
CSMD_BF16 static inline void micro_n(const uint32_t* xp, const uint32_t* wp, int kcp, float* C, int ldc, int mr,
                                     int nr, bool accumulate) {
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[i][v] = _mm512_setzero_ps();
  for (int p = 0; p < kcp; ++p, xp += MR, wp += 16 * NV) {
    __m512bh b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(wp + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[i]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], a, b[v]);
    }
  }
  store_tile<MR, NV>(c, C, ldc, mr, nr, accumulate);
}

CSMD_BF16 static inline void micro(const uint32_t* xp, const uint32_t* wp, int kcp, float* C, int ldc, int mr, int nr,
                                   bool accumulate) {
  micro_n<kBf16MR, kBf16NR / 16>(xp, wp, kcp, C, ldc, mr, nr, accumulate);
}

// The 16 bf16 values s * q + b for q = 0..15, rounded to nearest even, twice (the 32 words a vpermw indexes).
CSMD_BF16 static inline __m512i level_table(float s, float b) {
  const __m512 q = _mm512_cvtepi32_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512 w = _mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(b));
  return (__m512i)_mm512_cvtne2ps_pbh(w, w);
}

// Bf16GemmKernels::dequant. 4 bits: byte j of a row holds elements 2j (low nibble) and 2j + 1, so a byte is a
// pair: its two nibbles become the two halves of a word, which index the group's 16 levels (level_table) with
// one vpermw. 8 bits: 32 bytes are 32 elements in order, converted and rounded two vectors at a time.
CSMD_BF16 static inline void dequant(const uint8_t* w, const float* s, const float* b, int G, int bits, int k0, int kc,
                                     uint32_t* out) {
  if (bits == 4) {
    const __m512i lo_mask = _mm512_set1_epi32(0x0F), hi_mask = _mm512_set1_epi32(0xF0);
    for (int k = k0; k < k0 + kc; k += G) {
      const int g = k / G;
      const __m512i table = level_table(s[g], b[g]);
      for (int e = k; e < k + G; e += 32) {  // 16 bytes: 32 elements, 16 pairs
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + e / 2)));
        const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, lo_mask), _mm512_slli_epi32(_mm512_and_si512(v, hi_mask), 12));
        _mm512_storeu_si512(out + (e - k0) / 2, _mm512_permutexvar_epi16(idx, table));
      }
    }
    return;
  }
  for (int k = k0; k < k0 + kc; k += 32) {  // G >= 32: one group per 32 elements
    const int g = k / G;
    const __m512 sv = _mm512_set1_ps(s[g]), bv = _mm512_set1_ps(b[g]);
    const __m512 lo = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)))), sv, bv);
    const __m512 hi = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16)))), sv, bv);
    _mm512_storeu_si512(out + (k - k0) / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Bf16GemmKernels::pairs: bf16 elements are already what the product multiplies; consecutive ones are a pair.
CSMD_BF16 static inline void pairs(const uint16_t* w, int k0, int kc, uint32_t* out) {
  const uint16_t* src = w + k0;
  int k = 0;
  for (; k + 32 <= kc; k += 32) _mm512_storeu_si512(out + k / 2, _mm512_loadu_si512(src + k));
  for (; k < kc; k += 2) {
    const uint32_t lo = src[k], hi = k + 1 < kc ? src[k + 1] : 0u;
    out[k / 2] = lo | (hi << 16);
  }
}

inline Bf16GemmKernels kernels() {
  Bf16GemmKernels k;
  k.pack_x = pack_x;
  k.pack_w = pack_w;
  k.micro = micro;
  k.dequant = dequant;
  k.pairs = pairs;
  return k;
}

}  // namespace avx512bf16
}  // namespace csmd

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // x86-64
