// The blocked fp32 GEMM of gemm.h over the thread pool: x packed once, the weight rows in parts.
#pragma once

#include <algorithm>
#include <functional>
#include <vector>

#include "gemm.h"
#include "thread_pool.h"

namespace csmd {

// x packed for gemm_part (gemm_pack_x), the panels split over the pool.
inline void gemm_packed_x(const float* x, int M, int K, bool permute, ThreadPool* pool, std::vector<float>& xp) {
  xp.resize(gemm_packed_x_size(M, K));
  const int panels = gemm_padded_rows(M) / kGemmMR;
  std::function<void(int, int)> fn = [&](int i, int nt) {
    int p0, p1;
    split_range(panels, nt, i, p0, p1);
    gemm_pack_x(x, M, K, permute, p0, p1, xp.data());
  };
  run_split(pool, fn, xp.size() * sizeof(float));
}

// part(k, count) for the parts of a GEMM over N: a few per thread (each at least one weight block), handed
// out by run_chunks so that a thread that falls behind does not hold up the product; one part here when the
// job is too small to pay for waking the pool.
inline void run_gemm_parts(ThreadPool* pool, int N, size_t work_bytes, const std::function<void(int, int)>& part) {
  if (!pool || pool->size() == 1 || work_bytes < (64u << 10)) {
    part(0, 1);
    return;
  }
  const int blocks = (N + kGemmNC - 1) / kGemmNC;
  const int count = std::max(1, std::min(blocks, 4 * pool->size()));
  const std::function<void(int)> chunk = [&](int k) { part(k, count); };
  pool->run_chunks(count, chunk);
}

}  // namespace csmd
