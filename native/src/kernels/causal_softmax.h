// The causal softmax of prefill attention scores, its rows over the thread pool. No MLX or Python.
#pragma once

#include <cstddef>
#include <functional>

#include "kernel_table.h"
#include "thread_pool.h"

namespace csmd {

// Causal softmax of prefill attention scores: in/out [rows, S], row r holds query r % T of T new rows
// whose last one is key S - 1, so query i sees keys [0, S - T + i] (S >= T).  Rows split over the pool.
inline void causal_softmax_rows(const float* in, float* out, int rows, int T, int S, const Kernels& kern,
                           ThreadPool* pool) {
  std::function<void(int, int)> fn = [&](int i, int nt) {
    int r0, r1;
    split_range(rows, nt, i, r0, r1);
    for (int r = r0; r < r1; ++r) {
      const size_t off = static_cast<size_t>(r) * S;
      kern.softmax_row(in + off, S - T + r % T + 1, S, out + off);
    }
  };
  run_split(pool, fn, static_cast<size_t>(rows) * S * sizeof(float));
}

}  // namespace csmd
