// y[0..n) += a * x[0..n): the value-accumulation of attention over time-major values (kernels for
// mimi.cpp). Scalar, AVX2+FMA and NEON variants; axpy_kernel() picks one for a Variant.
#pragma once

#include "common.h"
#include "driver.h"

namespace csmd {

using AxpyFn = void (*)(float a, const float* x, int n, float* y);

namespace scalar {
inline void axpy(float a, const float* x, int n, float* y) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}
}  // namespace scalar

#if defined(CSMD_HAVE_AVX2_KERNELS)
namespace avx2 {
CSMD_AVX2 static inline void axpy(float a, const float* x, int n, float* y) {
  const __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}
}  // namespace avx2
#endif

#if defined(CSMD_HAVE_NEON_KERNELS)
namespace neon {
static inline void axpy(float a, const float* x, int n, float* y) {
  const float32x4_t va = vdupq_n_f32(a);
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, vld1q_f32(x + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}
}  // namespace neon
#endif

inline AxpyFn axpy_kernel(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (driver.h)
    case Variant::AVX512VNNI: return avx2::axpy;
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return neon::axpy;
#endif
    default: return scalar::axpy;
  }
}

}  // namespace csmd
