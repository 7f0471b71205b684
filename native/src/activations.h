// Elementwise activations of the Llama MLP on many rows (a prefill), where MLX's CPU sigmoid is a slow scalar
// loop on one core (42 ms for the 300 x 8192 values of one csm-1b layer).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

// silu(gate) * up = gate * sigmoid(gate) * up of float32 arrays of one shape, any shape: kernels/elu.h
// (std::invalid_argument -> ValueError).
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

class Swiglu : public mx::UnaryPrimitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdSwiglu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

}  // namespace csmd
