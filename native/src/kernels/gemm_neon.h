// AArch64 NEON many-row GEMM micro-kernel.
#pragma once

#if defined(__aarch64__)

#include <arm_neon.h>

#include "gemm_common.h"

namespace csmd {
namespace neon {

// C[m*ldc + n] (+)= sum_k xp[k*6 + m] * wp[k*16 + n] for m < mr, n < nr: each k
// loads 6 x values (4 + 2 lanes) and 4 weight vectors, 24 lane-indexed FMAs.
static inline void gemm_micro(const float* xp, const float* wp, int kc, float* C, int ldc, int mr, int nr,
                              bool accumulate) {
  static_assert(kGemmMR == 6 && kGemmNR == 16, "the NEON micro-kernel is 6 x 16");
  float32x4_t c[6][4];
  for (int m = 0; m < 6; ++m)
    for (int j = 0; j < 4; ++j) c[m][j] = vdupq_n_f32(0.f);
  for (int k = 0; k < kc; ++k, xp += 6, wp += 16) {
    const float32x4_t w[4] = {vld1q_f32(wp), vld1q_f32(wp + 4), vld1q_f32(wp + 8), vld1q_f32(wp + 12)};
    const float32x4_t x03 = vld1q_f32(xp);
    const float32x2_t x45 = vld1_f32(xp + 4);
    for (int j = 0; j < 4; ++j) {
      c[0][j] = vfmaq_laneq_f32(c[0][j], w[j], x03, 0);
      c[1][j] = vfmaq_laneq_f32(c[1][j], w[j], x03, 1);
      c[2][j] = vfmaq_laneq_f32(c[2][j], w[j], x03, 2);
      c[3][j] = vfmaq_laneq_f32(c[3][j], w[j], x03, 3);
      c[4][j] = vfmaq_lane_f32(c[4][j], w[j], x45, 0);
      c[5][j] = vfmaq_lane_f32(c[5][j], w[j], x45, 1);
    }
  }
  // Spill through a buffer: indexing c by the run-time mr would keep c in memory during the loop.
  float t[6][16];
  for (int m = 0; m < 6; ++m)
    for (int j = 0; j < 4; ++j) vst1q_f32(t[m] + 4 * j, c[m][j]);
  for (int m = 0; m < mr; ++m) {
    float* o = C + m * ldc;
    if (nr == 16) {
      for (int j = 0; j < 4; ++j)
        vst1q_f32(o + 4 * j, accumulate ? vaddq_f32(vld1q_f32(t[m] + 4 * j), vld1q_f32(o + 4 * j))
                                        : vld1q_f32(t[m] + 4 * j));
    } else {
      for (int n = 0; n < nr; ++n) o[n] = accumulate ? o[n] + t[m][n] : t[m][n];
    }
  }
}

inline void gemm_pack_w(const float* rows, int ldr, int nrows, int kc, float* wp) {
  gemm_pack_w_panels(rows, ldr, nrows, kc, wp);
}

}  // namespace neon
}  // namespace csmd

#endif  // aarch64
