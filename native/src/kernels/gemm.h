// Many-row fp32 GEMM for the matmul drivers: out[M, N] = x[M, K] @ W[N, K]^T where
// W is produced block by block by a "fill" callback (dequantized 4/8-bit rows,
// bf16 converted to fp32, or fp32 copied), so every weight is unpacked once
// per call and reused by all M rows.  No MLX.
//
// Blocking (BLIS style, threads over N):
//   x is packed once per call into K blocks of kGemmKC columns, each block
//   into panels of MR rows stored k-major (element (m, k) of a panel at
//   k*MR + m), so the micro-kernel broadcasts x from consecutive floats.
//   Each thread takes whole NR-column panels of the output; per chunk of
//   kGemmNC weight rows and K block it fills the rows (fp32, row-major) and
//   transposes them into NR-wide panels stored k-major (element (n, k) at
//   k*NR + n, zero rows past N).  A weight panel (KC x NR, 16 KB) stays in L1
//   while the x panels of up to kGemmMC rows (KC x MC, 192 KB) stream from L2.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "common.h"
#include "gemm_avx2.h"
#include "gemm_common.h"
#include "gemm_neon.h"
#include "gemm_scalar.h"

namespace csmd {

// C (+)= x panel times weight panel; see gemm_scalar.h.
using GemmMicro = void (*)(const float* xp, const float* wp, int kc, float* C, int ldc, int mr, int nr,
                           bool accumulate);
// Weight rows -> panels, as gemm_pack_w_panels (gemm_common.h).
using GemmPackW = void (*)(const float* rows, int ldr, int nrows, int kc, float* wp);

// The per-ISA pieces (one member of Kernels).
struct GemmKernels {
  GemmMicro micro;
  GemmPackW pack_w;
};

// K block: a multiple of 64 so that a 4-bit block of the permuted order (common.h) never straddles two.
constexpr int kGemmKC = 256;
constexpr int kGemmNC = 64;   // weight rows filled per chunk (4 panels)
constexpr int kGemmMC = 192;  // x rows per pass over a weight panel (multiple of MR)

inline int gemm_padded_rows(int M) { return (M + kGemmMR - 1) / kGemmMR * kGemmMR; }

inline size_t gemm_packed_x_size(int M, int K) { return static_cast<size_t>(gemm_padded_rows(M)) * K; }

// Pack the MR-row panels [p0, p1) of x ([M, K], row stride K) into xp (gemm_packed_x_size floats): K block
// b (k0 = b*KC) starts at padded_rows*k0, panel p of it at p*kc*MR.  Rows past M are zero.  permute4: take
// each row in the 4-bit permuted order (common.h), the order the dequantized 4-bit weights come in.
inline void gemm_pack_x(const float* x, int M, int K, bool permute, int p0, int p1, float* xp) {
  const size_t Mp = static_cast<size_t>(gemm_padded_rows(M));
  std::vector<float> tmp(permute ? K : 0);
  for (int p = p0; p < p1; ++p)
    for (int i = 0; i < kGemmMR; ++i) {
      const int m = p * kGemmMR + i;
      const float* row = nullptr;
      if (m < M) {
        row = x + static_cast<size_t>(m) * K;
        if (permute) {
          permute4(row, K, tmp.data());
          row = tmp.data();
        }
      }
      for (int k0 = 0; k0 < K; k0 += kGemmKC) {
        const int kc = std::min(kGemmKC, K - k0);
        float* dst = xp + Mp * k0 + static_cast<size_t>(p) * kc * kGemmMR + i;
        for (int k = 0; k < kc; ++k) dst[k * kGemmMR] = row ? row[k0 + k] : 0.f;
      }
    }
}

struct GemmArgs {
  int M = 0, N = 0, K = 0;
  const float* xp = nullptr;  // x packed by gemm_pack_x
  float* out = nullptr;       // [M, N]
  GemmKernels kern{};
};

// Part `part` of `parts` of the product (a contiguous range of NR-column panels).  Fill provides
//   fill.rows(n0, nrows): the next calls are for weight rows [n0, n0 + nrows) (nrows <= kGemmNC);
//   fill(k0, kc, dst, ldd): dst[r*ldd + k] = W[n0 + r, k0 + k] (fp32) for r < nrows, k < kc.
template <class Fill>
inline void gemm_part(const GemmArgs& g, Fill& fill, int part, int parts) {
  const int M = g.M, N = g.N, K = g.K;
  const int panels = (N + kGemmNR - 1) / kGemmNR;
  const int q0 = static_cast<int>(static_cast<long long>(panels) * part / parts);
  const int q1 = static_cast<int>(static_cast<long long>(panels) * (part + 1) / parts);
  if (q0 >= q1) return;
  const size_t Mp = static_cast<size_t>(gemm_padded_rows(M));
  std::vector<float> rows(static_cast<size_t>(kGemmNC) * kGemmKC), wp(rows.size());
  for (int n0 = q0 * kGemmNR; n0 < std::min(N, q1 * kGemmNR); n0 += kGemmNC) {
    const int nrows = std::min({kGemmNC, N - n0, q1 * kGemmNR - n0});
    fill.rows(n0, nrows);
    for (int k0 = 0; k0 < K; k0 += kGemmKC) {
      const int kc = std::min(kGemmKC, K - k0);
      fill(k0, kc, rows.data(), kGemmKC);
      g.kern.pack_w(rows.data(), kGemmKC, nrows, kc, wp.data());
      const float* xb = g.xp + Mp * k0;
      for (int m0 = 0; m0 < M; m0 += kGemmMC) {
        const int m1 = std::min(M, m0 + kGemmMC);
        for (int q = 0; q * kGemmNR < nrows; ++q) {
          const int nr = std::min(kGemmNR, nrows - q * kGemmNR);
          const float* w = wp.data() + static_cast<size_t>(q) * kc * kGemmNR;
          for (int m = m0; m < m1; m += kGemmMR)
            g.kern.micro(xb + static_cast<size_t>(m) * kc, w, kc, g.out + static_cast<size_t>(m) * N + n0 + q * kGemmNR,
                    N, std::min(kGemmMR, M - m), nr, k0 > 0);
        }
      }
    }
  }
}

}  // namespace csmd
