// The process's ClaimPool (kernels/claim_pool.h), sized like the ThreadPool of state.h.
#pragma once

#include "kernels/claim_pool.h"
#include "state.h"

namespace csmd {

// Follows set_num_threads: resized on the next use after the thread count changes.
inline ClaimPool& claim_pool() {
  static ClaimPool p(pool().size());
  if (p.size() != pool().size()) p.resize(pool().size());
  return p;
}

}  // namespace csmd
