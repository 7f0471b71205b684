// The many-row product of a prefill in bfloat16: out[M, N] = x[M, K] @ W[N, K]^T with x and W rounded to bf16
// (round to nearest even) and every product summed in fp32, on a CPU whose dot-product instruction multiplies
// bf16 pairs (AVX-512 BF16's vdpbf16ps: 32 products into 16 fp32 lanes, twice the fp32 FMA rate). W comes block
// by block from a "fill" (4/8-bit affine-quantized rows dequantized, or bf16 rows as they are), so every
// weight is unpacked once per call and reused by all M rows; the whole matrix is never held in bf16. No MLX.
//
// Layouts, in 32-bit words that each hold a bf16 pair (k, k + 1), k even, the low half first; a K that is odd
// pairs its last element with a zero:
//   x:  packed once per call, K block by K block (kBf16KC columns each, kcp = ceil(kc / 2) pairs): block b
//       starts at word Mp * (k0 / 2) (Mp: M rounded up to the tile), and in it the tile of rows
//       [t * MR, t * MR + MR) at t * kcp * MR, pair p of row i of the tile at p * MR + i (rows past M zero).
//   W:  a block of up to kBf16NC weight rows is filled as rows of kcp words, then packed into panels of NR
//       rows (output columns): panel q at q * kcp * NR, pair p of its row j at p * NR + j (rows past N zero).
// The micro-kernel broadcasts one pair of x per row of the tile and multiplies it with the panel's NR / 16
// vectors: MR x NR fp32 accumulators, which it then stores (or adds) into out.
//
// Blocking, threads over N as the fp32 GEMM (gemm.h): each thread takes whole chunks of kBf16NC weight rows;
// per K block it fills and packs them, then runs every (panel, x tile) pair, a panel (NR x KC bf16, 32 KB)
// staying in L1/L2 while the x tiles of the block (M x KC bf16, 150 KB at 300 rows) stream from L2.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "thread_pool.h"

namespace csmd {

// Measured on Zen 4 (BENCHMARKS.md, "bf16 prefill"): every tile of 24 accumulators (6 x 64, 12 x 32, 8 x 48, ...)
// runs at the instruction's peak from L1; 512 columns per K block (a 64 KB panel, in L2) halve the passes over
// the output against 256 and were 2-4% faster over a whole product.
constexpr int kBf16MR = 6;     // x rows per micro tile
constexpr int kBf16NR = 64;    // output columns per weight panel: 4 vectors of 16 lanes (24 accumulators)
constexpr int kBf16KC = 512;   // K per block: a multiple of every group size (32, 64, 128)
constexpr int kBf16NC = 64;    // weight rows filled per chunk: one panel

// The per-ISA pieces (Kernels::bf16, nullptr members where the CPU has no bf16 dot product).
struct Bf16GemmKernels {
  // Tiles [t0, t1) of x [M, K] (fp32, row stride K) into xp (bf16_packed_x_words(M, K) words).
  void (*pack_x)(const float* x, int M, int K, int t0, int t1, uint32_t* xp) = nullptr;
  // Rows [nrows, kcp] of pair words (row stride ldr) -> NR-row panels as above, rows past nrows zero.
  void (*pack_w)(const uint32_t* rows, int ldr, int nrows, int kcp, uint32_t* wp) = nullptr;
  // C[m * ldc + n] (+)= sum_p x pair (m, p) . w pair (n, p) for m < mr, n < nr (accumulate: add to C).
  void (*micro)(const uint32_t* xp, const uint32_t* wp, int kcp, float* C, int ldc, int mr, int nr,
                bool accumulate) = nullptr;
  // One affine-quantized weight row's columns [k0, k0 + kc) as kc / 2 pair words, each weight s * q + b (fp32,
  // s and b the row's per-group fp32 scales and biases) rounded to bf16. kc and k0 are multiples of G.
  void (*dequant)(const uint8_t* w, const float* s, const float* b, int G, int bits, int k0, int kc,
                  uint32_t* out) = nullptr;
  // One bf16 weight row's columns [k0, k0 + kc) as ceil(kc / 2) pair words (an odd kc ends with a zero half).
  void (*pairs)(const uint16_t* w, int k0, int kc, uint32_t* out) = nullptr;

  explicit operator bool() const { return micro != nullptr; }
};

inline int bf16_padded_rows(int M) { return (M + kBf16MR - 1) / kBf16MR * kBf16MR; }

inline size_t bf16_packed_x_words(int M, int K) {
  return static_cast<size_t>(bf16_padded_rows(M)) * static_cast<size_t>((K + 1) / 2);
}

struct Bf16GemmArgs {
  int M = 0, N = 0, K = 0;
  const uint32_t* xp = nullptr;  // x packed by Bf16GemmKernels::pack_x
  float* out = nullptr;          // [M, N]
};

// Part `part` of `parts` of the product: a contiguous range of NR-row panels of W. Fill provides
//   fill.rows(n0, nrows): the next calls are for weight rows [n0, n0 + nrows) (nrows <= kBf16NC);
//   fill(k0, kc, dst, ldd): dst[r * ldd + p] = the pair p of W[n0 + r, k0 .. k0 + kc) for r < nrows.
template <class Fill>
inline void bf16_gemm_part(const Bf16GemmArgs& g, const Bf16GemmKernels& kern, Fill& fill, int part, int parts) {
  const int M = g.M, N = g.N, K = g.K;
  const int panels = (N + kBf16NR - 1) / kBf16NR;
  const int q0 = static_cast<int>(static_cast<long long>(panels) * part / parts);
  const int q1 = static_cast<int>(static_cast<long long>(panels) * (part + 1) / parts);
  if (q0 >= q1) return;
  const size_t Mp = static_cast<size_t>(bf16_padded_rows(M));
  constexpr int kcp_max = kBf16KC / 2;
  std::vector<uint32_t> rows(static_cast<size_t>(kBf16NC) * kcp_max), wp(rows.size());
  for (int n0 = q0 * kBf16NR; n0 < std::min(N, q1 * kBf16NR); n0 += kBf16NC) {
    const int nrows = std::min({kBf16NC, N - n0, q1 * kBf16NR - n0});
    fill.rows(n0, nrows);
    for (int k0 = 0; k0 < K; k0 += kBf16KC) {
      const int kc = std::min(kBf16KC, K - k0), kcp = (kc + 1) / 2;
      fill(k0, kc, rows.data(), kcp_max);
      kern.pack_w(rows.data(), kcp_max, nrows, kcp, wp.data());
      const uint32_t* xb = g.xp + Mp * static_cast<size_t>(k0 / 2);
      for (int q = 0; q * kBf16NR < nrows; ++q) {
        const int nr = std::min(kBf16NR, nrows - q * kBf16NR);
        const uint32_t* w = wp.data() + static_cast<size_t>(q) * kcp * kBf16NR;
        for (int m = 0; m < M; m += kBf16MR)
          kern.micro(xb + static_cast<size_t>(m) * kcp, w, kcp, g.out + static_cast<size_t>(m) * N + n0 + q * kBf16NR,
                     N, std::min(kBf16MR, M - m), nr, k0 > 0);
      }
    }
  }
}

// x packed for bf16_gemm_part, its tiles split over the pool.
inline void bf16_packed_x(const float* x, int M, int K, const Bf16GemmKernels& kern, ThreadPool* pool,
                          std::vector<uint32_t>& xp) {
  xp.resize(bf16_packed_x_words(M, K));
  const int tiles = bf16_padded_rows(M) / kBf16MR;
  const std::function<void(int, int)> fn = [&](int i, int nt) {
    int t0, t1;
    split_range(tiles, nt, i, t0, t1);
    kern.pack_x(x, M, K, t0, t1, xp.data());
  };
  run_split(pool, fn, xp.size() * sizeof(uint32_t));
}

// The whole product over the pool: x packed once, then parts of W (a few per thread, each at least one chunk of
// rows) claimed by the threads; one part here when the job is too small to pay for waking the pool. make_fill()
// gives each part its own Fill (a fill holds the scales of its chunk).
template <class MakeFill>
inline void bf16_gemm(const float* x, int M, int N, int K, float* out, const Bf16GemmKernels& kern, ThreadPool* pool,
                      MakeFill make_fill) {
  std::vector<uint32_t> xp;
  bf16_packed_x(x, M, K, kern, pool, xp);
  const Bf16GemmArgs g{M, N, K, xp.data(), out};
  const auto part = [&](int k, int count) {
    auto fill = make_fill();
    bf16_gemm_part(g, kern, fill, k, count);
  };
  const size_t work = static_cast<size_t>(M) * N * K;
  if (!pool || pool->size() == 1 || work < (1u << 22)) {
    part(0, 1);
    return;
  }
  const int chunks = (N + kBf16NC - 1) / kBf16NC;
  const int count = std::max(1, std::min(chunks, 4 * pool->size()));
  const std::function<void(int)> chunk = [&](int k) { part(k, count); };
  pool->run_chunks(count, chunk);
}

}  // namespace csmd
