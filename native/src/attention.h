// The causal softmax of prefill attention (scores of T new query rows against S cached keys).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

// scores float32/bfloat16/float16 [..., T, S] with S >= T: each block of T rows holds queries whose last
// one is key S - 1, so query i sees keys [0, S - T + i].  Returns the softmax of each row over those keys
// (zeros past them), in the scores' dtype, computed in fp32 (std::invalid_argument -> ValueError).
mx::array causal_softmax(const mx::array& scores, mx::StreamOrDevice s = {});

class CausalSoftmax : public mx::UnaryPrimitive {
 public:
  explicit CausalSoftmax(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdCausalSoftmax"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

}  // namespace csmd
