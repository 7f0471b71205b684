// Block sizes and the portable weight packing of the many-row GEMM (gemm.h),
// shared by its per-ISA micro-kernels.
#pragma once

#include <cstddef>

namespace csmd {

// Micro-tile: MR rows of x by NR weight rows (output columns).  6 x 16 fp32 is
// 12 AVX2 accumulators (+2 weight vectors +1 broadcast of 16 registers) and
// 24 NEON ones (of 32).
constexpr int kGemmMR = 6;
constexpr int kGemmNR = 16;

// Columns [k_begin, kc) of one weight panel: panel[k*NR + j] = src[j*ldr + k] for
// j < nr, 0 for nr <= j < NR (the padding rows of a partial last panel).
inline void gemm_pack_w_ref(const float* src, int ldr, int nr, int k_begin, int kc, float* panel) {
  for (int k = k_begin; k < kc; ++k) {
    float* d = panel + k * kGemmNR;
    for (int j = 0; j < nr; ++j) d[j] = src[static_cast<size_t>(j) * ldr + k];
    for (int j = nr; j < kGemmNR; ++j) d[j] = 0.f;
  }
}

// rows [nrows, kc] (row stride ldr) -> NR-wide k-major panels (panel q at q*kc*NR), rows past nrows zero.
inline void gemm_pack_w_panels(const float* rows, int ldr, int nrows, int kc, float* wp) {
  for (int q = 0; q * kGemmNR < nrows; ++q) {
    const int nr = nrows - q * kGemmNR < kGemmNR ? nrows - q * kGemmNR : kGemmNR;
    gemm_pack_w_ref(rows + static_cast<size_t>(q) * kGemmNR * ldr, ldr, nr, 0, kc,
                    wp + static_cast<size_t>(q) * kc * kGemmNR);
  }
}

}  // namespace csmd
