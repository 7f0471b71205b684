// x @ w.T for bfloat16 / float32 weights in Linear layout [out, in].
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

// Validates inputs (std::invalid_argument -> ValueError) and returns a lazy array computed by the
// FMatmul primitive: x float32/bfloat16/float16 [..., in], w bfloat16 or float32 [out, in];
// the output has x's shape with the last dim out, and x's dtype.
mx::array matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});

// Inside a primitive's work: out[M, N] = x[M, K] @ w.T for w float32 or bfloat16 [N, K] (evaluated), each weight
// row read once for all M rows (kernels/fewrows.h), over the pool's threads.
void few_rows_product(const mx::array& w, const float* x, int M, float* out);

class FMatmul : public mx::UnaryPrimitive {
 public:
  explicit FMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdMatmul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

}  // namespace csmd
