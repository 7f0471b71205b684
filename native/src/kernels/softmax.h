// Row softmax with a causal limit, for prefill attention (scores of new query rows against the cache):
// out[j] = exp(x[j] - max) / sum over j < n, and out[j] = 0 for n <= j < S (out may be x; Mimi's streaming
// attention uses it in place).  Variants: scalar (std::exp), AVX2+FMA and NEON (a polynomial exp, ~2 ulp).
// No MLX.
#pragma once

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace csmd {

namespace scalar {

inline void softmax_row(const float* x, int n, int S, float* out) {
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  float sum = 0.f;
  for (int j = 0; j < n; ++j) sum += out[j] = std::exp(x[j] - mx);
  const float inv = 1.f / sum;
  for (int j = 0; j < n; ++j) out[j] *= inv;
  for (int j = n; j < S; ++j) out[j] = 0.f;
}

}  // namespace scalar

// exp(x) for x <= 0 (arguments are x - max): x = k ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial (Cephes expf coefficients), 2^k built in the exponent field; x below -87.3 gives 0.
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {

__attribute__((target("avx2,fma"))) static inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static inline void softmax_row(const float* x, int n, int S, float* out) {
  int j = 0;
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float mx = _mm_cvtss_f32(m4);
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmx));
    _mm256_storeu_ps(out + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, vs);
  float sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; j < n; ++j) sum += out[j] = std::exp(x[j] - mx);
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_loadu_ps(out + j), inv));
  for (; j < n; ++j) out[j] *= 1.f / sum;
  for (j = n; j < S; ++j) out[j] = 0.f;
}

}  // namespace avx2
#endif

#if defined(__aarch64__)
namespace neon {

static inline float32x4_t exp_neg(float32x4_t x) {
  x = vmaxq_f32(x, vdupq_n_f32(-87.3f));
  const float32x4_t k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
  float32x4_t r = vfmsq_f32(x, k, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, k, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), p, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

static inline void softmax_row(const float* x, int n, int S, float* out) {
  int j = 0;
  float32x4_t vm = vdupq_n_f32(-INFINITY);
  for (; j + 4 <= n; j += 4) vm = vmaxq_f32(vm, vld1q_f32(x + j));
  float mx = vmaxvq_f32(vm);
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  const float32x4_t vmx = vdupq_n_f32(mx);
  float32x4_t vs = vdupq_n_f32(0.f);
  for (j = 0; j + 4 <= n; j += 4) {
    const float32x4_t e = exp_neg(vsubq_f32(vld1q_f32(x + j), vmx));
    vst1q_f32(out + j, e);
    vs = vaddq_f32(vs, e);
  }
  float sum = vaddvq_f32(vs);
  for (; j < n; ++j) sum += out[j] = std::exp(x[j] - mx);
  const float32x4_t inv = vdupq_n_f32(1.f / sum);
  for (j = 0; j + 4 <= n; j += 4) vst1q_f32(out + j, vmulq_f32(vld1q_f32(out + j), inv));
  for (; j < n; ++j) out[j] *= 1.f / sum;
  for (j = n; j < S; ++j) out[j] = 0.f;
}

}  // namespace neon
#endif

}  // namespace csmd
