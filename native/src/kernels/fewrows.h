// Products of a few rows of x with a float32 or bfloat16 weight matrix in Linear layout:
//   out[m, n] = sum_k w[n, k] * x[m, k]   for m < M (a handful), n in [n0, n1).
//
// With two to eight rows (Mimi's streaming codec: 2 latent steps per 80 ms frame) the product is bound by
// reading the weights, as a matrix-vector product is. So each weight row is read from memory once and dotted
// with every x row while it sits in L1, instead of converting weight tiles for a GEMM micro kernel (the
// many-row path of fmatmul) or letting BLAS pack them.
//
// Scalar, AVX2+FMA and NEON variants with the same signature; fewrows_kernel() picks one for a Variant.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"
#include "cpu_features.h"
#include "thread_pool.h"

namespace csmd {

// x rows handled per pass over a weight row: 4 rows x 2 vectors of accumulators fit the 16 AVX2 registers
// next to the two weight vectors. Every path sums a row's dot in the same order (see row_pair_dots), so the
// result for one row of x does not depend on M or on which path M picks.
constexpr int kFewRowsChunk = 4;

// The x rows are reread for every weight row and must stay in L1 (32 KB here) while the weights stream
// through it. Past this many bytes of x the AVX2 kernel takes weight rows in pairs, which halves the x loads
// per weight byte; below it pairs were no faster or slower (BENCHMARKS.md, "The few-row product takes weight
// rows in pairs").
constexpr size_t kFewRowsXBytes = 16 << 10;

struct FewRowsArgs {
  const float* x = nullptr;  // [M, K] row-major
  int M = 0, K = 0, N = 0;
  const void* w = nullptr;  // [N, K]: float, or uint16 bfloat16 bits
  bool bf16 = false;
  float* out = nullptr;  // [M, N] row-major
};

using FewRowsFn = void (*)(const FewRowsArgs&, int n0, int n1);

namespace scalar {

inline void fewrows(const FewRowsArgs& a, int n0, int n1) {
  const size_t K = static_cast<size_t>(a.K);
  for (int n = n0; n < n1; ++n) {
    for (int m = 0; m < a.M; ++m) {
      const float* x = a.x + m * K;
      float s = 0.f;
      if (a.bf16) {
        const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
        for (size_t k = 0; k < K; ++k) s += bf16_to_f32(w[k]) * x[k];
      } else {
        const float* w = static_cast<const float*>(a.w) + n * K;
        for (size_t k = 0; k < K; ++k) s += w[k] * x[k];
      }
      a.out[static_cast<size_t>(m) * a.N + n] = s;
    }
  }
}

}  // namespace scalar

#if defined(CSMD_HAVE_AVX2_KERNELS)
namespace avx2 {

template <bool BF16>
CSMD_AVX2 static inline __m256 load_w8(const void* w, size_t k) {
  if constexpr (BF16) {
    return bf16x8(static_cast<const uint16_t*>(w) + k);
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  }
}

template <bool BF16>
static inline float w_at(const void* w, size_t k) {
  if constexpr (BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(w)[k]);
  } else {
    return static_cast<const float*>(w)[k];
  }
}

// Dots of one weight row with MR consecutive x rows (stride K), written to out[m * ldo].
template <int MR, bool BF16>
CSMD_AVX2 static inline void row_dots(const void* w, const float* x, int K, float* out, size_t ldo) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const size_t ldx = static_cast<size_t>(K);
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = load_w8<BF16>(w, k), w1 = load_w8<BF16>(w, k + 8);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * ldx + k + 8), acc[m][1]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 w0 = load_w8<BF16>(w, k);
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MR; ++m) {
    float s = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
    for (int j = k; j < K; ++j) s += w_at<BF16>(w, j) * x[m * ldx + j];
    out[m * ldo] = s;
  }
}

// Dots of two weight rows (w and w + ldw) with MR consecutive x rows (stride K): out[m * ldo + 0 / 1]. Each
// dot is summed exactly as row_dots sums it (two accumulators over alternate blocks of 8, then the scalar
// tail), so that a row's product is the same floats whichever path the size of x picks: a stream's output
// does not depend on how many other streams share its product (Mimi's batched decode).
template <int MR, bool BF16>
CSMD_AVX2 static inline void row_pair_dots(const void* w, size_t ldw, const float* x, int K, float* out,
                                           size_t ldo) {
  const size_t wsize = BF16 ? 2 : 4;
  const void* w1 = static_cast<const char*>(w) + ldw * wsize;
  __m256 acc[MR][2][2];  // [x row][weight row][block of 8: even, odd]
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 2; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  const size_t ldx = static_cast<size_t>(K);
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 a0 = load_w8<BF16>(w, k), a1 = load_w8<BF16>(w, k + 8);
    const __m256 b0 = load_w8<BF16>(w1, k), b1 = load_w8<BF16>(w1, k + 8);
    for (int m = 0; m < MR; ++m) {
      const __m256 x0 = _mm256_loadu_ps(x + m * ldx + k), x1 = _mm256_loadu_ps(x + m * ldx + k + 8);
      acc[m][0][0] = _mm256_fmadd_ps(a0, x0, acc[m][0][0]);
      acc[m][0][1] = _mm256_fmadd_ps(a1, x1, acc[m][0][1]);
      acc[m][1][0] = _mm256_fmadd_ps(b0, x0, acc[m][1][0]);
      acc[m][1][1] = _mm256_fmadd_ps(b1, x1, acc[m][1][1]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 a0 = load_w8<BF16>(w, k), b0 = load_w8<BF16>(w1, k);
    for (int m = 0; m < MR; ++m) {
      const __m256 x0 = _mm256_loadu_ps(x + m * ldx + k);
      acc[m][0][0] = _mm256_fmadd_ps(a0, x0, acc[m][0][0]);
      acc[m][1][0] = _mm256_fmadd_ps(b0, x0, acc[m][1][0]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 2; ++r) {
      float s = hsum(_mm256_add_ps(acc[m][r][0], acc[m][r][1]));
      for (int j = k; j < K; ++j) s += w_at<BF16>(r ? w1 : w, j) * x[m * ldx + j];
      out[m * ldo + r] = s;
    }
}

template <bool BF16>
CSMD_AVX2 static inline void fewrows_impl(const FewRowsArgs& a, int n0, int n1) {
  const size_t K = static_cast<size_t>(a.K), N = static_cast<size_t>(a.N);
  const size_t wsize = BF16 ? 2 : 4;
  if (static_cast<size_t>(a.M) * K * sizeof(float) > kFewRowsXBytes) {
    // x does not stay in L1: weight rows in pairs, x rows in pairs (4 accumulators a pass)
    for (; n0 + 2 <= n1; n0 += 2) {
      const void* w = static_cast<const char*>(a.w) + n0 * K * wsize;
      for (int m = 0; m < a.M; m += 2) {
        if (a.M - m >= 2)
          row_pair_dots<2, BF16>(w, K, a.x + m * K, a.K, a.out + m * N + n0, N);
        else
          row_pair_dots<1, BF16>(w, K, a.x + m * K, a.K, a.out + m * N + n0, N);
      }
    }
  }
  for (int n = n0; n < n1; ++n) {
    const void* w = static_cast<const char*>(a.w) + n * K * wsize;
    // The first chunk pulls the row from memory; the others find it in L1.
    for (int m = 0; m < a.M; m += kFewRowsChunk) {
      const float* x = a.x + m * K;
      float* out = a.out + m * N + n;
      switch (a.M - m) {
        case 1: row_dots<1, BF16>(w, x, a.K, out, N); break;
        case 2: row_dots<2, BF16>(w, x, a.K, out, N); break;
        case 3: row_dots<3, BF16>(w, x, a.K, out, N); break;
        default: row_dots<4, BF16>(w, x, a.K, out, N); break;
      }
    }
  }
}

CSMD_AVX2 static inline void fewrows(const FewRowsArgs& a, int n0, int n1) {
  if (a.bf16)
    fewrows_impl<true>(a, n0, n1);
  else
    fewrows_impl<false>(a, n0, n1);
}

}  // namespace avx2
#endif  // CSMD_HAVE_AVX2_KERNELS

#if defined(CSMD_HAVE_NEON_KERNELS)
namespace neon {

template <bool BF16>
static inline float32x4_t load_w4(const void* w, size_t k) {
  if constexpr (BF16) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(w) + k), 16));
  } else {
    return vld1q_f32(static_cast<const float*>(w) + k);
  }
}

template <bool BF16>
static inline float w_at(const void* w, size_t k) {
  if constexpr (BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(w)[k]);
  } else {
    return static_cast<const float*>(w)[k];
  }
}

// As avx2::row_dots with 4-lane vectors: MR x rows, two accumulators each.
template <int MR, bool BF16>
static inline void row_dots(const void* w, const float* x, int K, float* out, size_t ldo) {
  float32x4_t acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
  const size_t ldx = static_cast<size_t>(K);
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    const float32x4_t w0 = load_w4<BF16>(w, k), w1 = load_w4<BF16>(w, k + 4);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = vfmaq_f32(acc[m][0], w0, vld1q_f32(x + m * ldx + k));
      acc[m][1] = vfmaq_f32(acc[m][1], w1, vld1q_f32(x + m * ldx + k + 4));
    }
  }
  for (int m = 0; m < MR; ++m) {
    float s = vaddvq_f32(vaddq_f32(acc[m][0], acc[m][1]));
    for (int j = k; j < K; ++j) s += w_at<BF16>(w, j) * x[m * ldx + j];
    out[m * ldo] = s;
  }
}

template <bool BF16>
static inline void fewrows_impl(const FewRowsArgs& a, int n0, int n1) {
  const size_t K = static_cast<size_t>(a.K), N = static_cast<size_t>(a.N);
  const size_t wsize = BF16 ? 2 : 4;
  for (int n = n0; n < n1; ++n) {
    const void* w = static_cast<const char*>(a.w) + n * K * wsize;
    for (int m = 0; m < a.M; m += kFewRowsChunk) {
      const float* x = a.x + m * K;
      float* out = a.out + m * N + n;
      switch (a.M - m) {
        case 1: row_dots<1, BF16>(w, x, a.K, out, N); break;
        case 2: row_dots<2, BF16>(w, x, a.K, out, N); break;
        case 3: row_dots<3, BF16>(w, x, a.K, out, N); break;
        default: row_dots<4, BF16>(w, x, a.K, out, N); break;
      }
    }
  }
}

static inline void fewrows(const FewRowsArgs& a, int n0, int n1) {
  if (a.bf16)
    fewrows_impl<true>(a, n0, n1);
  else
    fewrows_impl<false>(a, n0, n1);
}

}  // namespace neon
#endif  // CSMD_HAVE_NEON_KERNELS

inline FewRowsFn fewrows_kernel(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (kernel_table.h)
    case Variant::AVX512VNNI: return avx2::fewrows;
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return neon::fewrows;
#endif
    default: return scalar::fewrows;
  }
}

// The whole product, its weight rows in chunks that the pool's threads claim (run_rows, as the matvecs).
inline void fewrows_matmul(const FewRowsArgs& a, FewRowsFn kernel, ThreadPool& pool) {
  const size_t row_bytes = static_cast<size_t>(a.K) * (a.bf16 ? 2 : 4);
  run_rows(&pool, a.N, row_bytes, [&](int n0, int n1) { kernel(a, n0, n1); });
}

}  // namespace csmd
