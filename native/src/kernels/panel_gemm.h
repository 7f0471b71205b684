// out[M, N] = x[M, K] @ W.T (+ bias) with W pre-packed in panels of 16 output columns:
//   wp[p, k, j] = W[16 p + j, k]   (zero for 16 p + j >= N), float32 [ceil(N / 16), K, 16].
//
// For Mimi's SEANet convolutions (tens to thousands of rows, K and N from 32 to 3072), whose weights are
// constants: packing once at load lets the micro kernel stream one contiguous 64-byte row of a panel per k
// and broadcast x, 6 rows x 16 columns of accumulators (12 AVX2 registers), 2 loads per 12 FMAs.
//
// Scalar, AVX2+FMA and NEON variants of the micro kernel; panel_kernel() picks one for a Variant.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "thread_pool.h"
#include "strided_rows.h"

namespace csmd {

constexpr int kPanel = 16;  // output columns per packed panel
constexpr int kPanelRows = 6;  // x rows per micro tile

struct PanelArgs {
  const float* x = nullptr;  // M rows of K, row m at x + m * ldx
  int M = 0, K = 0, N = 0;
  // Row stride of x; K for a plain matrix. A causal convolution (kernel k, stride s) over time-major
  // [L, C] input is the product with rows of K = k C floats every s C: its windows overlap in place, so
  // no unfolded copy is needed.
  size_t ldx = 0;
  const float* wp = nullptr;    // [ceil(N / 16), K, 16]
  const float* bias = nullptr;  // [N] or null
  const float* residual = nullptr;  // [M, N] added to the result (after the bias), or null
  float* out = nullptr;         // [M, N]
};

// Rows [m0, m0 + rows) (rows <= kPanelRows) x panel p.
using PanelFn = void (*)(const PanelArgs&, int m0, int rows, int p);

// Stores a row's 16 accumulated columns (fewer in the last panel), adding the bias, then the residual.
inline void store_panel_row(const PanelArgs& a, int m, int p, const float* acc) {
  const int n0 = p * kPanel, n = std::min(kPanel, a.N - n0);
  const size_t row = static_cast<size_t>(m) * a.N + n0;
  float* out = a.out + row;
  for (int j = 0; j < n; ++j) out[j] = acc[j] + (a.bias ? a.bias[n0 + j] : 0.f);
  if (a.residual)
    for (int j = 0; j < n; ++j) out[j] = a.residual[row + j] + out[j];
}

namespace scalar {
inline void panel_tile(const PanelArgs& a, int m0, int rows, int p) {
  const float* w = a.wp + static_cast<size_t>(p) * a.K * kPanel;
  for (int i = 0; i < rows; ++i) {
    float acc[kPanel] = {};
    const float* x = a.x + (m0 + i) * a.ldx;
    for (int k = 0; k < a.K; ++k)
      for (int j = 0; j < kPanel; ++j) acc[j] += x[k] * w[k * kPanel + j];
    store_panel_row(a, m0 + i, p, acc);
  }
}
}  // namespace scalar

#if defined(CSMD_HAVE_AVX2_KERNELS)
namespace avx2 {
// The accumulators are indexed by constants only (every loop over i unrolled, their results stored to a
// local block before the rows are written out): when the write-out loop indexed them, GCC kept them in
// memory and stored all 12 every step of k.
template <int MR>
CSMD_AVX2 static inline void panel_tile_n(const PanelArgs& a, int m0, int p) {
  const int K = a.K;
  const float* w = a.wp + static_cast<size_t>(p) * K * kPanel;
  const float* x = a.x + m0 * a.ldx;
  const size_t ldx = a.ldx;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(w + k * kPanel), b1 = _mm256_loadu_ps(w + k * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 xi = _mm256_broadcast_ss(x + i * ldx + k);
      acc[i][0] = _mm256_fmadd_ps(xi, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xi, b1, acc[i][1]);
    }
  }
  alignas(32) float rows[MR][kPanel];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(rows[i], acc[i][0]);
    _mm256_store_ps(rows[i] + 8, acc[i][1]);
  }
  for (int i = 0; i < MR; ++i) store_panel_row(a, m0 + i, p, rows[i]);
}

CSMD_AVX2 static inline void panel_tile(const PanelArgs& a, int m0, int rows, int p) {
  switch (rows) {
    case 1: panel_tile_n<1>(a, m0, p); break;
    case 2: panel_tile_n<2>(a, m0, p); break;
    case 3: panel_tile_n<3>(a, m0, p); break;
    case 4: panel_tile_n<4>(a, m0, p); break;
    case 5: panel_tile_n<5>(a, m0, p); break;
    default: panel_tile_n<6>(a, m0, p); break;
  }
}
}  // namespace avx2
#endif

#if defined(CSMD_HAVE_NEON_KERNELS)
namespace neon {
template <int MR>
static inline void panel_tile_n(const PanelArgs& a, int m0, int p) {
  const float* w = a.wp + static_cast<size_t>(p) * a.K * kPanel;
  const float* x = a.x + m0 * a.ldx;
  const size_t ldx = a.ldx;
  const int K = a.K;
  float32x4_t acc[MR][4];  // indexed by constants only, as in the AVX2 kernel
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = vdupq_n_f32(0.f);
  for (int k = 0; k < K; ++k) {
    const float* wk = w + k * kPanel;
    const float32x4_t b0 = vld1q_f32(wk), b1 = vld1q_f32(wk + 4), b2 = vld1q_f32(wk + 8), b3 = vld1q_f32(wk + 12);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float xi = x[i * ldx + k];
      acc[i][0] = vfmaq_n_f32(acc[i][0], b0, xi);
      acc[i][1] = vfmaq_n_f32(acc[i][1], b1, xi);
      acc[i][2] = vfmaq_n_f32(acc[i][2], b2, xi);
      acc[i][3] = vfmaq_n_f32(acc[i][3], b3, xi);
    }
  }
  float rows[MR][kPanel];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) vst1q_f32(rows[i] + 4 * j, acc[i][j]);
  for (int i = 0; i < MR; ++i) store_panel_row(a, m0 + i, p, rows[i]);
}

static inline void panel_tile(const PanelArgs& a, int m0, int rows, int p) {
  switch (rows) {
    case 1: panel_tile_n<1>(a, m0, p); break;
    case 2: panel_tile_n<2>(a, m0, p); break;
    case 3: panel_tile_n<3>(a, m0, p); break;
    case 4: panel_tile_n<4>(a, m0, p); break;
    case 5: panel_tile_n<5>(a, m0, p); break;
    default: panel_tile_n<6>(a, m0, p); break;
  }
}
}  // namespace neon
#endif

inline PanelFn panel_kernel(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (kernel_table.h)
    case Variant::AVX512VNNI: return avx2::panel_tile;
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return neon::panel_tile;
#endif
    default: return scalar::panel_tile;
  }
}

// N == 1 (SEANet's last convolution, to one channel): a panel's other 15 columns are zeros, so the micro
// kernel would compute 16x the products; each row is dotted with the one column instead (`dots`: the
// variant's strided_rows row_dots), in row ranges over the pool.
inline void panel_gemv(const PanelArgs& a, RowDotsFn dots, ThreadPool& pool) {
  std::vector<float> w(a.K);
  for (int k = 0; k < a.K; ++k) w[k] = a.wp[static_cast<size_t>(k) * kPanel];
  const int chunks = std::max(1, std::min(4 * pool.size(), a.M / 64));
  const std::function<void(int)> fn = [&](int c) {
    int m0, m1;
    split_range(a.M, chunks, c, m0, m1);
    dots(w.data(), a.x + m0 * a.ldx, a.ldx, m1 - m0, a.K, a.out + m0);
    if (a.bias)
      for (int m = m0; m < m1; ++m) a.out[m] += a.bias[0];
    if (a.residual)
      for (int m = m0; m < m1; ++m) a.out[m] = a.residual[m] + a.out[m];
  };
  pool.run_chunks(chunks, fn);
}

// The whole product, in chunks that the pool's threads claim:
// - When all the packed weights fit in L2 (SEANet's long convolutions: K x N up to 128 k floats), chunks of row
//   tiles, each tile through every panel: the output rows (and the residual) are then written whole and in
//   order. Panel by panel instead, each pass wrote one 64-byte line of every output row, over twice the time
//   for SEANet's long 1x1 convolutions with a residual (BENCHMARKS.md, "Fifth session").
// - Else chunks of (panels x row tiles), so a chunk reuses its panels from cache while x streams.
constexpr size_t kPanelWeightsInL2 = 512 << 10;

inline void panel_gemm(const PanelArgs& a, PanelFn tile, ThreadPool& pool) {
  const int panels = (a.N + kPanel - 1) / kPanel;
  const int row_tiles = (a.M + kPanelRows - 1) / kPanelRows;
  const int want = 4 * pool.size();
  const auto tiles = [&](int t0, int t1, int p) {
    for (int t = t0; t < t1; ++t) {
      const int m0 = t * kPanelRows;
      tile(a, m0, std::min(kPanelRows, a.M - m0), p);
    }
  };
  if (static_cast<size_t>(panels) * a.K * kPanel * sizeof(float) <= kPanelWeightsInL2 && row_tiles >= want) {
    const std::function<void(int)> fn = [&](int c) {
      int t0, t1;
      split_range(row_tiles, want, c, t0, t1);
      for (int t = t0; t < t1; ++t)
        for (int p = 0; p < panels; ++p) tiles(t, t + 1, p);
    };
    pool.run_chunks(want, fn);
    return;
  }
  // Split over panels when there are enough of them, else over row tiles too.
  const int row_split = panels >= want ? 1 : std::min(row_tiles, (want + panels - 1) / panels);
  const int chunks = panels * row_split;
  const std::function<void(int)> fn = [&](int c) {
    int t0, t1;
    split_range(row_tiles, row_split, c / panels, t0, t1);
    tiles(t0, t1, c % panels);
  };
  pool.run_chunks(chunks, fn);
}

// The whole product for the variant: row dots for one output column (panel_gemv), else panel tiles.
inline void panel_product(const PanelArgs& a, Variant v, ThreadPool& pool) {
  if (a.N == 1)
    panel_gemv(a, strided_rows_kernels(v).row_dots, pool);
  else
    panel_gemm(a, panel_kernel(v), pool);
}

}  // namespace csmd
