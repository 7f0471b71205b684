// AVX2+FMA many-row GEMM micro-kernel (run-time dispatched like avx2.h).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include "gemm_common.h"

#define CSMD_GEMM_AVX2 __attribute__((target("avx2,fma")))

namespace csmd {
namespace avx2 {

// C[m*ldc + n] (+)= sum_k xp[k*6 + m] * wp[k*16 + n] for m < mr, n < nr: each k
// broadcasts 6 x values against two 8-wide weight vectors into 12 accumulators.
CSMD_GEMM_AVX2 static inline void gemm_micro(const float* xp, const float* wp, int kc, float* C, int ldc,
                                             int mr, int nr, bool accumulate) {
  static_assert(kGemmMR == 6 && kGemmNR == 16, "the AVX2 micro-kernel is 6 x 16");
  // Twelve named accumulators: GCC keeps an array of them in memory across the loop.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kc; ++k, xp += 6, wp += 16) {
    const __m256 w0 = _mm256_loadu_ps(wp), w1 = _mm256_loadu_ps(wp + 8);
    __m256 x = _mm256_broadcast_ss(xp);
    c00 = _mm256_fmadd_ps(x, w0, c00);
    c01 = _mm256_fmadd_ps(x, w1, c01);
    x = _mm256_broadcast_ss(xp + 1);
    c10 = _mm256_fmadd_ps(x, w0, c10);
    c11 = _mm256_fmadd_ps(x, w1, c11);
    x = _mm256_broadcast_ss(xp + 2);
    c20 = _mm256_fmadd_ps(x, w0, c20);
    c21 = _mm256_fmadd_ps(x, w1, c21);
    x = _mm256_broadcast_ss(xp + 3);
    c30 = _mm256_fmadd_ps(x, w0, c30);
    c31 = _mm256_fmadd_ps(x, w1, c31);
    x = _mm256_broadcast_ss(xp + 4);
    c40 = _mm256_fmadd_ps(x, w0, c40);
    c41 = _mm256_fmadd_ps(x, w1, c41);
    x = _mm256_broadcast_ss(xp + 5);
    c50 = _mm256_fmadd_ps(x, w0, c50);
    c51 = _mm256_fmadd_ps(x, w1, c51);
  }
  // Spill through a buffer, then add the valid mr x nr part to C.
  alignas(32) float t[6][16];
  _mm256_store_ps(t[0], c00);
  _mm256_store_ps(t[0] + 8, c01);
  _mm256_store_ps(t[1], c10);
  _mm256_store_ps(t[1] + 8, c11);
  _mm256_store_ps(t[2], c20);
  _mm256_store_ps(t[2] + 8, c21);
  _mm256_store_ps(t[3], c30);
  _mm256_store_ps(t[3] + 8, c31);
  _mm256_store_ps(t[4], c40);
  _mm256_store_ps(t[4] + 8, c41);
  _mm256_store_ps(t[5], c50);
  _mm256_store_ps(t[5] + 8, c51);
  for (int m = 0; m < mr; ++m) {
    float* o = C + m * ldc;
    if (nr == 16) {
      __m256 lo = _mm256_load_ps(t[m]), hi = _mm256_load_ps(t[m] + 8);
      if (accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(o));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(o + 8));
      }
      _mm256_storeu_ps(o, lo);
      _mm256_storeu_ps(o + 8, hi);
    } else {
      for (int n = 0; n < nr; ++n) o[n] = accumulate ? o[n] + t[m][n] : t[m][n];
    }
  }
}

// 8x8 transpose of rows src[r*lds + 0..8) into dst[k*ldd + 0..8) (dst row k = column k of src).
CSMD_GEMM_AVX2 static inline void transpose8(const float* src, int lds, float* dst, int ldd) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds);
  __m256 r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds);
  __m256 r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds);
  __m256 r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44);
  r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44);
  r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  r4 = _mm256_shuffle_ps(t4, t6, 0x44);
  r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  r6 = _mm256_shuffle_ps(t5, t7, 0x44);
  r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(r0, r4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(r1, r5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(r2, r6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(r3, r7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(r0, r4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(r1, r5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(r2, r6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(r3, r7, 0x31));
}

// gemm_pack_w (gemm.h) with 8x8 register transposes for full panels; the generic loop does the rest.
CSMD_GEMM_AVX2 static inline void gemm_pack_w(const float* rows, int ldr, int nrows, int kc, float* wp) {
  const int full = nrows / kGemmNR, k8 = kc & ~7;
  for (int q = 0; q < full; ++q) {
    const float* src = rows + static_cast<size_t>(q) * kGemmNR * ldr;
    float* panel = wp + static_cast<size_t>(q) * kc * kGemmNR;
    for (int k = 0; k < k8; k += 8) {
      transpose8(src + k, ldr, panel + k * kGemmNR, kGemmNR);
      transpose8(src + 8 * ldr + k, ldr, panel + k * kGemmNR + 8, kGemmNR);
    }
    gemm_pack_w_ref(src, ldr, kGemmNR, k8, kc, panel);
  }
  if (full * kGemmNR < nrows)
    gemm_pack_w_ref(rows + static_cast<size_t>(full) * kGemmNR * ldr, ldr, nrows - full * kGemmNR, 0, kc,
                    wp + static_cast<size_t>(full) * kc * kGemmNR);
}

}  // namespace avx2
}  // namespace csmd

#endif  // x86-64
