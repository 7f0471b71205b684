// Products with rows stored at a fixed stride, one vector against many rows:
//   row_dots:     out[j] = q . rows[j * stride .. + len)                       for j < n
//   weighted_sum: out[i] += sum over j < n of p[j] * rows[j * stride + i]      for i < len
// Their users: one attention head over Mimi's time-major key/value rings (head h is `len` floats at offset
// h * len of each row; mimi.cpp), and a convolution to one output channel over its overlapping input windows
// (panel_gemm.h's single-column case).
// The AVX2 versions take 4 rows per pass (one horizontal reduction for the 4) and keep a head's output in
// registers across all the value rows: at Mimi's 64 floats a head, one call per key or value row spent more
// on the call, the reduction and reloading the output than on the arithmetic.
// Scalar, AVX2+FMA and NEON variants; strided_rows_kernels() picks them for a Variant.
#pragma once

#include <cstddef>

#include "common.h"
#include "cpu_features.h"
#include "scalar.h"
#include "thread_pool.h"

namespace csmd {

using RowDotsFn = void (*)(const float* q, const float* rows, size_t stride, int n, int len, float* out);
using WeightedSumFn = void (*)(const float* p, const float* rows, size_t stride, int n, int len, float* out);

struct StridedRowKernels {
  RowDotsFn row_dots;
  WeightedSumFn weighted_sum;
};

namespace scalar {
inline void row_dots(const float* q, const float* rows, size_t stride, int n, int len, float* out) {
  for (int j = 0; j < n; ++j) out[j] = dot_f32(q, rows + j * stride, len);
}

inline void weighted_sum(const float* p, const float* rows, size_t stride, int n, int len, float* out) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < len; ++i) out[i] += p[j] * rows[j * stride + i];
}
}  // namespace scalar

#if defined(CSMD_HAVE_AVX2_KERNELS)
namespace avx2 {
CSMD_AVX2 static inline void row_dots(const float* q, const float* rows, size_t stride, int n, int len,
                                      float* out) {
  const int body = len / 8 * 8;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* r = rows + j * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int i = 0; i < body; i += 8) {
      const __m256 qi = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + i), a0);
      a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + stride + i), a1);
      a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + 2 * stride + i), a2);
      a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + 3 * stride + i), a3);
    }
    // [a0 a0 a1 a1 | a0 a0 a1 a1] pairs, then [a0 a1 a2 a3 | a0 a1 a2 a3] quarter sums, then the halves
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out + j, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    for (int i = body; i < len; ++i)
      for (int k = 0; k < 4; ++k) out[j + k] += q[i] * r[k * stride + i];
  }
  for (; j < n; ++j) out[j] = dot_f32(q, rows + j * stride, len);
}

CSMD_AVX2 static inline void weighted_sum(const float* p, const float* rows, size_t stride, int n, int len,
                                          float* out) {
  int i = 0;
  for (; i + 64 <= len; i += 64) {  // 64 columns (Mimi's head) in 8 registers over all the rows
    __m256 acc[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_loadu_ps(out + i + 8 * k);
    for (int j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* r = rows + j * stride + i;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 8 * k), acc[k]);
    }
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out + i + 8 * k, acc[k]);
  }
  for (; i + 8 <= len; i += 8) {
    __m256 acc = _mm256_loadu_ps(out + i);
    for (int j = 0; j < n; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(rows + j * stride + i), acc);
    _mm256_storeu_ps(out + i, acc);
  }
  for (; i < len; ++i)
    for (int j = 0; j < n; ++j) out[i] += p[j] * rows[j * stride + i];
}
}  // namespace avx2
#endif

#if defined(CSMD_HAVE_NEON_KERNELS)
namespace neon {
static inline void row_dots(const float* q, const float* rows, size_t stride, int n, int len, float* out) {
  for (int j = 0; j < n; ++j) out[j] = dot_f32(q, rows + j * stride, len);
}

static inline void weighted_sum(const float* p, const float* rows, size_t stride, int n, int len, float* out) {
  for (int j = 0; j < n; ++j) {
    const float32x4_t pj = vdupq_n_f32(p[j]);
    const float* r = rows + j * stride;
    int i = 0;
    for (; i + 4 <= len; i += 4) vst1q_f32(out + i, vfmaq_f32(vld1q_f32(out + i), pj, vld1q_f32(r + i)));
    for (; i < len; ++i) out[i] += p[j] * r[i];
  }
}
}  // namespace neon
#endif

inline StridedRowKernels strided_rows_kernels(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (kernel_table.h)
    case Variant::AVX512VNNI: return {avx2::row_dots, avx2::weighted_sum};
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return {neon::row_dots, neon::weighted_sum};
#endif
    default: return {scalar::row_dots, scalar::weighted_sum};
  }
}

}  // namespace csmd
