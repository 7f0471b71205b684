// Products with affine-quantized weights (MLX's layout, 4 or 8 bits): the single-row kernels of a matvec mode
// for one or a few rows of x, the GEMM on dequantized weight blocks for many. No MLX or Python.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "common.h"
#include "gemm_bf16.h"
#include "gemm_pool.h"
#include "kernel_table.h"
#include "thread_pool.h"

namespace csmd {

// Scale / bias dtypes (converted per weight row, never for the whole matrix).

enum class SBType { F32 = 0, F16 = 1, BF16 = 2 };

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t man = h & 0x3FF;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      u = sign | ((127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000 | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void load_row(const void* base, SBType t, size_t offset, int n, float* out) {
  switch (t) {
    case SBType::F32: std::memcpy(out, static_cast<const float*>(base) + offset, 4 * n); break;
    case SBType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      break;
    }
    case SBType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      break;
    }
  }
}

// Quantized matmul: out[m, n] = sum_k x[m, k] * (s[n, k/G] * q[n, k] + b[n, k/G])
//   x: [M, K] float32 (natural order), w: [N, K*bits/8] bytes,
//   scales/biases: [N, K/G] of type sbt, out: [M, N] float32.
// mode selects the single-row (M == 1) path:
//   Exact: float unpacking, fp32 accumulation (dot_f);
//   Int16: x quantized per group to int16 (dx = max|x_g|/32767), integer dot
//          products summed per group in int32 (dot_i16; ~1e-5 relative);
//   Int8:  x quantized per group to int8 for 4 bits (dx = max|x_g|/127, about
//          0.5% relative per product), int16 for 8 bits (dot_i).
// For 8-bit weights Int16 and Int8 are the same (int16 x).  A few rows of x go
// through the single-row path each (qmatvec_rows, up to kMatvecRows); more use
// the fp32 GEMM (gemm.h) on weights dequantized block by block (qgemm).
enum class MatvecMode { Exact = 0, Int8 = 1, Int16 = 2 };

struct QMatmulArgs {
  const float* x = nullptr;
  int M = 0, K = 0, N = 0, G = 64, bits = 4;
  const uint8_t* w = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  SBType sbt = SBType::F32;
  float* out = nullptr;
};

// x of a matrix-vector product prepared once (for one or several matrices of
// the same K, G and bits) and the row kernel of the chosen mode.
struct MatvecPrep {
  std::vector<float> xf, gsum, gdx, gcorr;
  std::vector<int8_t> xq, tmp;
  std::vector<int16_t> xq16, tmp16;
  XPrep p;
  Kernels::RowDot dot = nullptr;
  Kernels::RowDotBf16 dot_bf16_sb = nullptr;
  Kernels::RowDotsBf16 dots_bf16_sb = nullptr;  // dot_bf16_sb over several rows of x (each its own prep)
  float (*dot_f32)(const float*, const float*, int) = nullptr;

  MatvecPrep(const float* x, int K, int G, int bits, const Kernels& kern, MatvecMode mode)
      : gsum(K / G), gdx(K / G), dot_f32(kern.dot_f32) {
    // The groups of 64 that have their own SIMD prep and bf16-scale kernels: int16 x (the Int16 mode, and
    // both integer modes at 8 bits), and int8 x at 4 bits.
    const bool int16_g64 = mode != MatvecMode::Exact && (bits == 8 || mode == MatvecMode::Int16) && G == 64;
    const bool int8_g64 = mode == MatvecMode::Int8 && bits == 4 && G == 64;
    if (int16_g64 && kern.prep_i16_g64) {
      xq16.resize(K);
      kern.prep_i16_g64(x, K, bits == 4, xq16.data(), gdx.data(), gsum.data());
      p.xq16 = xq16.data();
      simd_prepared(K, G, bits);
      centre(K, G, bits, xq16.data());  // permuted within each group of 64: the groups are intact
    } else if (int8_g64 && kern.prep_i8_g64) {
      xq.resize(K);
      kern.prep_i8_g64(x, K, xq.data(), gdx.data(), gsum.data());
      p.xq = xq.data();
      simd_prepared(K, G, bits);
      centre(K, G, bits, xq.data());
    } else if (mode == MatvecMode::Int16 && bits == 4) {
      xq16.resize(K);
      tmp16.resize(K);
      prep_gsum(x, K, G, bits, gsum.data(), p);
      prep_x_i16_4(x, K, G, xq16.data(), tmp16.data(), gdx.data(), p);
      centre(K, G, bits, tmp16.data());  // natural order (xq16 is permuted across groups when G = 32)
    } else {
      xf.resize(K);
      prep_x_float(x, K, G, bits, xf.data(), gsum.data(), p);
      if (mode != MatvecMode::Exact) {
        tmp.resize(K);
        if (bits == 4) xq.resize(K); else xq16.resize(K);
        prep_x_int(x, K, G, bits, xq.data(), xq16.data(), tmp.data(), gdx.data(), p);
        if (bits == 4)
          centre(K, G, bits, tmp.data());  // natural order, as above
        else
          centre(K, G, bits, xq16.data());  // natural order at 8 bits
      }
    }
    dot = mode == MatvecMode::Exact ? kern.dot_f
          : (mode == MatvecMode::Int16 ? kern.dot_i16 : kern.dot_i);
    if (int16_g64) {
      dot_bf16_sb = kern.dot_i16_g64_bf16;
      dots_bf16_sb = kern.dots_i16_g64_bf16;
    } else if (int8_g64) {
      dot_bf16_sb = kern.dot_i8_g64_bf16;
      dots_bf16_sb = kern.dots_i8_g64_bf16;
    }
  }

  // Centring. The kernels multiply x's integers by the weights' unsigned levels q (0..15 or 0..255), so x's
  // rounding error e meets sum_k s q_k e_k, and q's mean (about the mid level c) makes that error several
  // times larger than the one of the weights' signed part s (q - c): the weight w = s q + b is the same as
  // s (q - c) + (b + c s). So a row adds sum_g s_g * c * (gsum_g - gdx_g * sum of the group's integers),
  // which moves the c s part onto the exact float sums. Same products, a cheap per-group term that cuts
  // the int8 mode's error several-fold, the int16 mode's less (BENCHMARKS.md, "centred integer products"). q: x's integers in an order that
  // keeps each group's G values together.
  template <class Q>
  void centre(int K, int G, int bits, const Q* q) {
    const int ng = K / G;
    gcorr.resize(ng);
    const double c = bits == 4 ? 7.5 : 127.5;
    for (int g = 0; g < ng; ++g) {
      long long sum = 0;
      for (int i = 0; i < G; ++i) sum += q[g * G + i];
      gcorr[g] = static_cast<float>(c * (static_cast<double>(gsum[g]) - static_cast<double>(gdx[g]) * sum));
    }
    p.gcorr = gcorr.data();
  }

  // The rest of p after a SIMD prep filled gdx and gsum.
  void simd_prepared(int K, int G, int bits) {
    p.K = K;
    p.G = G;
    p.bits = bits;
    p.gdx = gdx.data();
    p.gsum = gsum.data();
  }

  // a.out[n] for n in [n0, n1) (a.x is ignored: the prepared x is used).
  void rows(const QMatmulArgs& a, int n0, int n1) const {
    const int ng = p.K / p.G;
    const size_t row_bytes = static_cast<size_t>(p.K) * p.bits / 8;
    if (a.sbt == SBType::BF16 && dot_bf16_sb) {
      const auto* s16 = static_cast<const uint16_t*>(a.scales);
      const auto* b16 = static_cast<const uint16_t*>(a.biases);
      for (int n = n0; n < n1; ++n)
        a.out[n] = dot_bf16_sb(a.w + n * row_bytes, s16 + static_cast<size_t>(n) * ng, b16 + static_cast<size_t>(n) * ng, p);
      return;
    }
    float s[8192 / 32], b[8192 / 32];  // up to K = 8192 at G = 32 on the stack
    std::vector<float> sv, bv;
    float* sp = s;
    float* bp = b;
    if (ng > 8192 / 32) {
      sv.resize(ng);
      bv.resize(ng);
      sp = sv.data();
      bp = bv.data();
    }
    for (int n = n0; n < n1; ++n) {
      load_row(a.scales, a.sbt, static_cast<size_t>(n) * ng, ng, sp);
      load_row(a.biases, a.sbt, static_cast<size_t>(n) * ng, ng, bp);
      a.out[n] = dot(a.w + n * row_bytes, sp, bp, p) + (p.gcorr ? dot_f32(sp, p.gcorr, ng) : 0.f);
    }
  }
};

// The fp32 scales and biases of a chunk of weight rows (up to `capacity`), loaded once per chunk: what both
// GEMM fills below dequantize with. `rows` picks the chunk, as gemm_part and bf16_gemm_part ask.
struct ChunkScales {
  const QMatmulArgs& a;
  std::vector<float> s, b;
  int n0 = 0, nrows = 0;

  ChunkScales(const QMatmulArgs& args, int capacity)
      : a(args), s(static_cast<size_t>(capacity) * (args.K / args.G)), b(s.size()) {}

  void rows(int first, int count) {
    const int ng = a.K / a.G;
    n0 = first;
    nrows = count;
    for (int r = 0; r < count; ++r) {
      load_row(a.scales, a.sbt, static_cast<size_t>(n0 + r) * ng, ng, s.data() + r * ng);
      load_row(a.biases, a.sbt, static_cast<size_t>(n0 + r) * ng, ng, b.data() + r * ng);
    }
  }

  const uint8_t* row_bytes(int r) const { return a.w + (n0 + r) * (static_cast<size_t>(a.K) * a.bits / 8); }
  const float* row_scales(int r) const { return s.data() + r * (a.K / a.G); }
  const float* row_biases(int r) const { return b.data() + r * (a.K / a.G); }
};

// gemm_part's weight rows of an affine-quantized matrix, dequantized to fp32 (4 bits: in the permuted order
// of common.h, which gemm_pack_x gives x too).  One per thread.
struct QuantFill : ChunkScales {
  const Kernels& kern;

  QuantFill(const QMatmulArgs& args, const Kernels& k) : ChunkScales(args, kGemmNC), kern(k) {}

  void operator()(int k0, int kc, float* dst, int ldd) const {
    for (int r = 0; r < nrows; ++r)
      kern.dequant(row_bytes(r), row_scales(r), row_biases(r), a.K, a.G, a.bits, k0, kc,
                   dst + static_cast<size_t>(r) * ldd);
  }
};

inline void qgemm(const QMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  std::vector<float> xp;
  gemm_packed_x(a.x, a.M, a.K, a.bits == 4, pool, xp);
  const GemmArgs g{a.M, a.N, a.K, xp.data(), a.out, kern.gemm};
  run_gemm_parts(pool, a.N, static_cast<size_t>(a.K) * a.bits / 8 * a.N * a.M, [&](int part, int parts) {
    QuantFill fill(a, kern);
    gemm_part(g, fill, part, parts);
  });
}

// bf16_gemm_part's weight rows of an affine-quantized matrix, dequantized to bf16 pairs in natural order. One
// per part.
struct QuantPairsFill : ChunkScales {
  const Bf16GemmKernels& kern;

  QuantPairsFill(const QMatmulArgs& args, const Bf16GemmKernels& k) : ChunkScales(args, kBf16NC), kern(k) {}

  void operator()(int k0, int kc, uint32_t* dst, int ldd) const {
    for (int r = 0; r < nrows; ++r)
      kern.dequant(row_bytes(r), row_scales(r), row_biases(r), a.G, a.bits, k0, kc, dst + static_cast<size_t>(r) * ldd);
  }
};

// The many-row product in bf16 (gemm_bf16.h): x and the dequantized weights rounded to bf16, fp32 sums. For
// kernels that have it (kern.bf16); the prefill setting decides when it runs (qmatmul.cpp).
inline void qgemm_bf16(const QMatmulArgs& a, const Bf16GemmKernels& kern, ThreadPool* pool) {
  bf16_gemm(a.x, a.M, a.N, a.K, a.out, kern, pool, [&] { return QuantPairsFill(a, kern); });
}

// Up to this many rows a quantized product runs the single-row kernels on each row (qmatvec_rows) rather than
// the GEMM on dequantized weights, which dequantizes and packs every weight however few the rows. The integer
// kernels cost the same per row at any count and match the GEMM's rate around 64 rows; the exact (float) ones
// are slower per row and beat the GEMM only at 2-3 rows (BENCHMARKS.md, "Fourth session: short prefills").
// The integer modes thus reach short prefills (a user's turn) with the activations' rounding they already
// have in every generated frame.
constexpr int kMatvecRows = 64, kMatvecRowsExact = 3;

// The single-row kernels of `mode` for each of the M rows of x, through `count` matrices of one K, G and bits
// that share x (a[c].x [M, K] the same for every c; a[c].out [M, a[c].N]), as one pool job. Each row of x is
// prepared once, and each row of its output is the one-row product's (MatvecPrep::rows), whatever M is and
// however the rows are spread over the threads.
//   paired == false: the rows of all outputs are split over the threads together;
//   paired == true:  all N are equal; each thread computes rows [n0, n1) of every output for every row of x,
//                    then calls post(n0, n1) (if given) on them, e.g. an elementwise op joining the outputs.
inline void qmatvec_multi(const QMatmulArgs* a, int count, const Kernels& kern, MatvecMode mode, ThreadPool* pool,
                          bool paired = false, const std::function<void(int, int)>* post = nullptr) {
  const int K = a[0].K, M = a[0].M;
  std::vector<std::unique_ptr<MatvecPrep>> preps;
  for (int m = 0; m < M; ++m)
    preps.push_back(
        std::make_unique<MatvecPrep>(a[0].x + static_cast<size_t>(m) * K, K, a[0].G, a[0].bits, kern, mode));
  std::vector<QMatmulArgs> outs;  // [c * M + m]: matrix c's product with row m of x
  for (int c = 0; c < count; ++c)
    for (int m = 0; m < M; ++m) {
      outs.push_back(a[c]);
      outs.back().out = a[c].out + static_cast<size_t>(m) * a[c].N;
    }
  const size_t row_bytes = static_cast<size_t>(K) * a[0].bits / 8;
  // One row of x: nothing to share a block with, so a chunk at a time, as one product always ran.
  int widest = 1;
  for (int c = 0; c < count; ++c) widest = std::max(widest, a[c].N);
  const int block = M == 1 ? widest : weight_block_rows(row_bytes);
  // bf16 scales read in place by a kernel that takes several rows of x at once: each weight group is loaded
  // and unpacked once for them all (the preps share K, G, bits and mode, so they have the same kernels).
  const bool together = M > 1 && M <= kMatvecRows && preps[0]->dots_bf16_sb && preps[0]->dot_bf16_sb;
  std::vector<const XPrep*> xps;
  for (const auto& prep : preps) xps.push_back(&prep->p);
  // Rows [n0, n1) of matrix c for every row of x: a weight row at a time through all rows of x, or a block of
  // weight rows at a time through each row of x.
  const auto span = [&](int c, int n0, int n1) {
    if (together && a[c].sbt == SBType::BF16) {
      const int ng = K / a[c].G;
      const auto* s16 = static_cast<const uint16_t*>(a[c].scales);
      const auto* b16 = static_cast<const uint16_t*>(a[c].biases);
      float dots[kMatvecRows];
      for (int n = n0; n < n1; ++n) {
        const size_t at = static_cast<size_t>(n) * ng;
        preps[0]->dots_bf16_sb(a[c].w + n * row_bytes, s16 + at, b16 + at, xps.data(), M, dots);
        for (int m = 0; m < M; ++m) a[c].out[static_cast<size_t>(m) * a[c].N + n] = dots[m];
      }
      return;
    }
    for (int b0 = n0; b0 < n1; b0 += block)
      for (int m = 0; m < M; ++m) preps[m]->rows(outs[static_cast<size_t>(c) * M + m], b0, std::min(n1, b0 + block));
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
  // the outputs' rows one after another, chunked together
  run_rows(pool, rows, row_bytes, [&](int r0, int r1) {
    int base = 0;
    for (int c = 0; c < count; ++c) {
      const int lo = std::max(r0, base), hi = std::min(r1, base + a[c].N);
      if (lo < hi) span(c, lo - base, hi - base);
      base += a[c].N;
    }
  });
}

// The single-row kernels of `mode` for each of the M rows of x (qmatvec_multi of one matrix).
inline void qmatvec_rows(const QMatmulArgs& a, const Kernels& kern, MatvecMode mode, ThreadPool* pool) {
  qmatvec_multi(&a, 1, kern, mode, pool);
}

inline void qmatmul(const QMatmulArgs& a, const Kernels& kern, MatvecMode mode, ThreadPool* pool) {
  if (a.M <= (mode == MatvecMode::Exact ? kMatvecRowsExact : kMatvecRows))
    qmatvec_rows(a, kern, mode, pool);
  else
    qgemm(a, kern, pool);
}

}  // namespace csmd
