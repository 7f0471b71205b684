// Products with float weights (bfloat16 or float32, Linear layout): one pass over the weights for one row of
// x, the blocked GEMM for many. No MLX or Python.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "gemm_bf16.h"
#include "gemm_pool.h"
#include "kernel_table.h"
#include "thread_pool.h"

namespace csmd {

// Float weights: out[m, n] = sum_k x[m, k] * w[n, k] with w bfloat16 or float32
// [N, K] (Linear layout), fp32 arithmetic, any K.
//   M == 1: rows split over the threads, each row one pass over its weights
//           (dot_bf16 / dot_f32: every weight byte read once);
//   M > 1:  the blocked fp32 GEMM of gemm.h on weight blocks converted to fp32
//           (fgemm).
struct FMatmulArgs {
  const float* x = nullptr;  // [M, K]
  int M = 0, K = 0, N = 0;
  const void* w = nullptr;   // [N, K] uint16 (bfloat16 bits) or float
  bool bf16 = true;
  float* out = nullptr;      // [M, N]
};

inline size_t fweight_bytes(const FMatmulArgs& a) {
  return static_cast<size_t>(a.N) * a.K * (a.bf16 ? 2 : 4);
}

// a.out[n] = w[n] . a.x for n in [n0, n1).
inline void fmatvec_rows(const FMatmulArgs& a, const Kernels& kern, int n0, int n1) {
  const size_t K = static_cast<size_t>(a.K);
  if (a.bf16) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w);
    for (int n = n0; n < n1; ++n) a.out[n] = kern.dot_bf16(w + n * K, a.x, a.K);
  } else {
    const float* w = static_cast<const float*>(a.w);
    for (int n = n0; n < n1; ++n) a.out[n] = kern.dot_f32(w + n * K, a.x, a.K);
  }
}

// gemm_part's weight rows of a bfloat16 or float32 matrix, as fp32.
struct FloatFill {
  const FMatmulArgs& a;
  const Kernels& kern;
  int n0 = 0, nrows = 0;

  void rows(int first, int count) {
    n0 = first;
    nrows = count;
  }

  void operator()(int k0, int kc, float* dst, int ldd) const {
    for (int r = 0; r < nrows; ++r) {
      const size_t off = static_cast<size_t>(n0 + r) * a.K + k0;
      float* d = dst + static_cast<size_t>(r) * ldd;
      if (a.bf16)
        kern.cvt_bf16(static_cast<const uint16_t*>(a.w) + off, kc, d);
      else
        std::memcpy(d, static_cast<const float*>(a.w) + off, sizeof(float) * kc);
    }
  }
};

inline void fgemm(const FMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  std::vector<float> xp;
  gemm_packed_x(a.x, a.M, a.K, false, pool, xp);
  const GemmArgs g{a.M, a.N, a.K, xp.data(), a.out, kern.gemm};
  run_gemm_parts(pool, a.N, fweight_bytes(a) * static_cast<size_t>(a.M), [&](int part, int parts) {
    FloatFill fill{a, kern};
    gemm_part(g, fill, part, parts);
  });
}

// bf16_gemm_part's weight rows of a bfloat16 matrix, as the pairs they already are.
struct Bf16PairsFill {
  const FMatmulArgs& a;
  const Bf16GemmKernels& kern;
  int n0 = 0, nrows = 0;

  void rows(int first, int count) {
    n0 = first;
    nrows = count;
  }

  void operator()(int k0, int kc, uint32_t* dst, int ldd) const {
    const auto* w = static_cast<const uint16_t*>(a.w);
    for (int r = 0; r < nrows; ++r)
      kern.pairs(w + static_cast<size_t>(n0 + r) * a.K, k0, kc, dst + static_cast<size_t>(r) * ldd);
  }
};

// The many-row product of bf16 weights in bf16 (gemm_bf16.h): x rounded to bf16, fp32 sums. a.bf16 must hold.
inline void fgemm_bf16(const FMatmulArgs& a, const Bf16GemmKernels& kern, ThreadPool* pool) {
  bf16_gemm(a.x, a.M, a.N, a.K, a.out, kern, pool, [&] { return Bf16PairsFill{a, kern}; });
}

// Several float products as one pool job, each row of x through the one-row kernel (fmatvec_rows), so a row's
// output is the one-row product's whatever M is: a[c].x [M, K] (the same K and dtype for every c),
// a[c].out [M, a[c].N]. A block of weight rows comes from memory once, for the first row of x, and from cache
// for the others. paired and post as in qmatvec_multi.
inline void fmatvec_multi(const FMatmulArgs* a, int count, const Kernels& kern, ThreadPool* pool,
                          bool paired = false, const std::function<void(int, int)>* post = nullptr) {
  const int M = a[0].M;
  std::vector<FMatmulArgs> outs;  // [c * M + m]: matrix c's product with row m of its x
  for (int c = 0; c < count; ++c)
    for (int m = 0; m < M; ++m) {
      outs.push_back(a[c]);
      outs.back().M = 1;
      outs.back().x = a[c].x + static_cast<size_t>(m) * a[c].K;
      outs.back().out = a[c].out + static_cast<size_t>(m) * a[c].N;
    }
  const size_t row_bytes = fweight_bytes(a[0]) / a[0].N;
  // One row of x: nothing to share a block with, so a chunk at a time, as one product always ran.
  int widest = 1;
  for (int c = 0; c < count; ++c) widest = std::max(widest, a[c].N);
  const int block = M == 1 ? widest : weight_block_rows(row_bytes);
  const auto span = [&](int c, int n0, int n1) {
    for (int b0 = n0; b0 < n1; b0 += block)
      for (int m = 0; m < M; ++m)
        fmatvec_rows(outs[static_cast<size_t>(c) * M + m], kern, b0, std::min(n1, b0 + block));
  };
  if (paired) {  // all N equal: each chunk is rows [n0, n1) of every output, then post
    run_rows(pool, a[0].N, row_bytes * count, [&](int n0, int n1) {
      for (int b0 = n0; b0 < n1; b0 += block)
        for (int c = 0; c < count; ++c) span(c, b0, std::min(n1, b0 + block));
      if (post && n1 > n0) (*post)(n0, n1);
    });
    return;
  }
  int rows = 0;
  for (int c = 0; c < count; ++c) rows += a[c].N;
  // the outputs' rows one after another, chunked together (all of one K and dtype in the model)
  run_rows(pool, rows, row_bytes, [&](int r0, int r1) {
    int base = 0;
    for (int c = 0; c < count; ++c) {
      const int lo = std::max(r0, base), hi = std::min(r1, base + a[c].N);
      if (lo < hi) span(c, lo - base, hi - base);
      base += a[c].N;
    }
  });
}

// Each of the M rows of x through the one-row kernel (fmatvec_multi of one matrix).
inline void fmatvec_batch(const FMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  fmatvec_multi(&a, 1, kern, pool);
}

inline void fmatmul(const FMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  if (a.M == 1)
    fmatvec_batch(a, kern, pool);
  else
    fgemm(a, kern, pool);
}

}  // namespace csmd
