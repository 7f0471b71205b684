// Portable many-row GEMM micro-kernel (always compiled; the reference the SIMD
// versions are checked against).  Packed layouts: see gemm.h.
#pragma once

#include "gemm_common.h"

namespace csmd {
namespace scalar {

// C[m*ldc + n] (+)= sum_k xp[k*MR + m] * wp[k*NR + n] for m < mr, n < nr.
// accumulate == false overwrites C (first K block).
inline void gemm_micro(const float* xp, const float* wp, int kc, float* C, int ldc, int mr, int nr,
                       bool accumulate) {
  float acc[kGemmMR][kGemmNR] = {};
  for (int k = 0; k < kc; ++k) {
    const float* x = xp + k * kGemmMR;
    const float* w = wp + k * kGemmNR;
    for (int m = 0; m < kGemmMR; ++m)
      for (int n = 0; n < kGemmNR; ++n) acc[m][n] += x[m] * w[n];
  }
  for (int m = 0; m < mr; ++m)
    for (int n = 0; n < nr; ++n) C[m * ldc + n] = accumulate ? C[m * ldc + n] + acc[m][n] : acc[m][n];
}

inline void gemm_pack_w(const float* rows, int ldr, int nrows, int kc, float* wp) {
  gemm_pack_w_panels(rows, ldr, nrows, kc, wp);
}

}  // namespace scalar
}  // namespace csmd
