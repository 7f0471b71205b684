// ELU (alpha 1) over float32: y = x for x > 0, exp(x) - 1 otherwise; the exact (erf) GELU of Mimi's
// transformer MLP, with erf as fastmath.erf (Abramowitz & Stegun 7.1.26, within 6e-7), in place; and the
// SwiGLU of a Llama MLP over many rows (a prefill), silu(g) * u = g * sigmoid(g) * u. Mimi's SEANet runs ~550 k of them per
// 80 ms frame; these SIMD loops take a fraction of the time of MLX's compiled elementwise loop of
// csmd/audio/mimi/fastmath.py (the reference, same formula; BENCHMARKS.md, "Figures moved out of the code").
//
// exp(z) for z <= 0 as fastmath.exp_nonpositive: 2^n exp(r), n = round(z / ln 2), |r| <= ln(2) / 2, a degree-7
// Taylor polynomial (remainder < 6e-9), z clamped at -87 so that 2^n stays normal.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#include "common.h"
#include "cpu_features.h"
#include "thread_pool.h"

namespace csmd {

using EluFn = void (*)(const float* x, int n, float* y);
using GeluFn = void (*)(float* x, int n);
using SiluMulFn = void (*)(const float* g, const float* u, int n, float* y);

namespace elu_const {
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f;  // exact in float32 times any |n| <= 126 (Cody & Waite)
constexpr float kLn2Lo = 1.4286068203094172e-06f;
constexpr float kTaylor[8] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f};  // r^7..r^0
// erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x), x >= 0; coefficients highest first.
constexpr float kErfP = 0.3275911f;
constexpr float kErfA[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};
constexpr float kSqrtHalf = 0.70710678118654752f;
}  // namespace elu_const

namespace scalar {
inline float exp_nonpositive(float z) {
  using namespace elu_const;
  z = std::max(z, -87.f);
  const int n = static_cast<int>(z * kLog2e - 0.5f);  // truncation toward zero of a value <= -0.5: rounds
  const float nf = static_cast<float>(n);
  const float r = (z - nf * kLn2Hi) - nf * kLn2Lo;
  float p = kTaylor[0];
  for (int i = 1; i < 8; ++i) p = p * r + kTaylor[i];
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return two_n * p;
}

inline void elu(const float* x, int n, float* y) {
  for (int i = 0; i < n; ++i) y[i] = x[i] > 0.f ? x[i] : exp_nonpositive(x[i]) - 1.f;
}

inline void gelu(float* x, int n) {
  using namespace elu_const;
  for (int i = 0; i < n; ++i) {
    const float z = x[i] * kSqrtHalf, a = std::fabs(z);
    const float t = 1.f / (1.f + kErfP * a);
    float p = kErfA[0];
    for (int j = 1; j < 5; ++j) p = p * t + kErfA[j];
    const float erf_abs = 1.f - t * p * exp_nonpositive(-a * a);
    x[i] = 0.5f * x[i] * (1.f + (z < 0.f ? -erf_abs : erf_abs));
  }
}
// y = g * sigmoid(g) * u, the sigmoid from e = exp(-|g|) (never overflows): 1 / (1 + e) for g >= 0, else
// e / (1 + e).
inline void silu_mul(const float* g, const float* u, int n, float* y) {
  for (int i = 0; i < n; ++i) {
    const float e = exp_nonpositive(-std::fabs(g[i]));
    const float sigmoid = (g[i] >= 0.f ? 1.f : e) / (1.f + e);
    y[i] = g[i] * sigmoid * u[i];
  }
}
}  // namespace scalar

#if defined(CSMD_HAVE_AVX2_KERNELS)
namespace avx2 {
CSMD_AVX2 static inline __m256 exp_nonpositive(__m256 z) {
  using namespace elu_const;
  z = _mm256_max_ps(z, _mm256_set1_ps(-87.f));
  const __m256i n = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_mul_ps(z, _mm256_set1_ps(kLog2e)), _mm256_set1_ps(0.5f)));
  const __m256 nf = _mm256_cvtepi32_ps(n);
  const __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(nf, _mm256_set1_ps(kLn2Hi), z));
  __m256 p = _mm256_set1_ps(kTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kTaylor[i]));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(two_n, p);
}

CSMD_AVX2 static inline void elu(const float* x, int n, float* y) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 neg = _mm256_sub_ps(exp_nonpositive(_mm256_min_ps(v, zero)), one);
    _mm256_storeu_ps(y + i, _mm256_blendv_ps(neg, v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
  }
  scalar::elu(x + i, n - i, y + i);
}

CSMD_AVX2 static inline void gelu(float* x, int n) {
  using namespace elu_const;
  const __m256 sign_bit = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(kSqrtHalf));
    const __m256 a = _mm256_andnot_ps(sign_bit, z);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(kErfP), a, one));
    __m256 p = _mm256_set1_ps(kErfA[0]);
    for (int j = 1; j < 5; ++j) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kErfA[j]));
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(t, p), e, one);
    const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign_bit, z));  // z's sign
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, erf)));
  }
  scalar::gelu(x + i, n - i);
}

CSMD_AVX2 static inline void silu_mul(const float* g, const float* u, int n, float* y) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    const __m256 e = exp_nonpositive(_mm256_or_ps(v, sign_bit));  // exp(-|g|)
    const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
    const __m256 sigmoid = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(v, sigmoid), _mm256_loadu_ps(u + i)));
  }
  scalar::silu_mul(g + i, u + i, n - i, y + i);
}
}  // namespace avx2
#endif

#if defined(CSMD_HAVE_NEON_KERNELS)
namespace neon {
static inline float32x4_t exp_nonpositive(float32x4_t z) {
  using namespace elu_const;
  z = vmaxq_f32(z, vdupq_n_f32(-87.f));
  const int32x4_t n = vcvtq_s32_f32(vsubq_f32(vmulq_f32(z, vdupq_n_f32(kLog2e)), vdupq_n_f32(0.5f)));
  const float32x4_t nf = vcvtq_f32_s32(n);
  const float32x4_t r = vfmsq_f32(vfmsq_f32(z, nf, vdupq_n_f32(kLn2Hi)), nf, vdupq_n_f32(kLn2Lo));
  float32x4_t p = vdupq_n_f32(kTaylor[0]);
  for (int i = 1; i < 8; ++i) p = vfmaq_f32(vdupq_n_f32(kTaylor[i]), p, r);
  const float32x4_t two_n = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n, vdupq_n_s32(127)), 23));
  return vmulq_f32(two_n, p);
}

static inline void elu(const float* x, int n, float* y) {
  const float32x4_t zero = vdupq_n_f32(0.f), one = vdupq_n_f32(1.f);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    const float32x4_t neg = vsubq_f32(exp_nonpositive(vminq_f32(v, zero)), one);
    vst1q_f32(y + i, vbslq_f32(vcgtq_f32(v, zero), v, neg));
  }
  scalar::elu(x + i, n - i, y + i);
}

static inline void gelu(float* x, int n) {
  using namespace elu_const;
  const float32x4_t one = vdupq_n_f32(1.f);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    const float32x4_t z = vmulq_n_f32(v, kSqrtHalf);
    const float32x4_t a = vabsq_f32(z);
    const float32x4_t t = vdivq_f32(one, vfmaq_n_f32(one, a, kErfP));
    float32x4_t p = vdupq_n_f32(kErfA[0]);
    for (int j = 1; j < 5; ++j) p = vfmaq_f32(vdupq_n_f32(kErfA[j]), p, t);
    const float32x4_t e = exp_nonpositive(vnegq_f32(vmulq_f32(a, a)));
    const float32x4_t erf_abs = vfmsq_f32(one, vmulq_f32(t, p), e);
    const float32x4_t erf = vbslq_f32(vcltq_f32(z, vdupq_n_f32(0.f)), vnegq_f32(erf_abs), erf_abs);
    vst1q_f32(x + i, vmulq_f32(vmulq_n_f32(v, 0.5f), vaddq_f32(one, erf)));
  }
  scalar::gelu(x + i, n - i);
}

static inline void silu_mul(const float* g, const float* u, int n, float* y) {
  const float32x4_t one = vdupq_n_f32(1.f);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t v = vld1q_f32(g + i);
    const float32x4_t e = exp_nonpositive(vnegq_f32(vabsq_f32(v)));
    const float32x4_t num = vbslq_f32(vcgeq_f32(v, vdupq_n_f32(0.f)), one, e);
    const float32x4_t sigmoid = vdivq_f32(num, vaddq_f32(one, e));
    vst1q_f32(y + i, vmulq_f32(vmulq_f32(v, sigmoid), vld1q_f32(u + i)));
  }
  scalar::silu_mul(g + i, u + i, n - i, y + i);
}
}  // namespace neon
#endif

inline EluFn elu_kernel(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (kernel_table.h)
    case Variant::AVX512VNNI: return avx2::elu;
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return neon::elu;
#endif
    default: return scalar::elu;
  }
}

// y = ELU(x) over the pool's threads for large n. The SIMD loop takes ~0.4 ns a value on one x86 core (the
// polynomial exp), so a pool job (a few us) pays from ~16 k values on; SEANet's largest is 123 k.
inline void elu_pooled(EluFn kernel, const float* x, size_t n, float* y, ThreadPool& pool) {
  constexpr size_t kChunkValues = 16 << 10;
  const int chunks = static_cast<int>(std::max<size_t>(1, std::min<size_t>(2 * pool.size(), n / kChunkValues)));
  if (chunks == 1) return kernel(x, static_cast<int>(n), y);
  const std::function<void(int)> fn = [&](int c) {
    int i0, i1;
    split_range(static_cast<int>(n), chunks, c, i0, i1);
    kernel(x + i0, i1 - i0, y + i0);
  };
  pool.run_chunks(chunks, fn);
}

inline GeluFn gelu_kernel(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (kernel_table.h)
    case Variant::AVX512VNNI: return avx2::gelu;
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return neon::gelu;
#endif
    default: return scalar::gelu;
  }
}

inline SiluMulFn silu_mul_kernel(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:  // AVX512VNNI only differs in the matvec dots (kernel_table.h)
    case Variant::AVX512VNNI: return avx2::silu_mul;
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON: return neon::silu_mul;
#endif
    default: return scalar::silu_mul;
  }
}

// y = silu(g) * u over the pool's threads for large n, in chunks as elu_pooled.
inline void silu_mul_pooled(SiluMulFn kernel, const float* g, const float* u, size_t n, float* y, ThreadPool& pool) {
  constexpr size_t kChunkValues = 16 << 10;
  const int chunks = static_cast<int>(std::max<size_t>(1, std::min<size_t>(4 * pool.size(), n / kChunkValues)));
  if (chunks == 1) return kernel(g, u, static_cast<int>(n), y);
  const std::function<void(int)> fn = [&](int c) {
    size_t i0, i1;
    i0 = n * c / chunks;
    i1 = n * (c + 1) / chunks;
    kernel(g + i0, u + i0, static_cast<int>(i1 - i0), y + i0);
  };
  pool.run_chunks(chunks, fn);
}

}  // namespace csmd
