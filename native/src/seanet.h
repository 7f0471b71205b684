// One streaming step of a SEANet convolution (Mimi's codec), with what surrounds it in the layer list fused in:
// the ELU before it, the concatenation with its state, its bias, and a residual sum after it.
#pragma once

#include <optional>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

struct SeanetConvConfig {
  int n = 0;       // output channels
  int kernel = 0;  // taps (a transposed convolution: 2 * stride)
  int stride = 1;
  bool transposed = false;
  bool elu_input = false;  // ELU (alpha 1) of x first
  bool has_state = false, has_bias = false, has_residual = false;
};

// The weights of both: float32 or bfloat16 [n_rows, K] as is (a few rows: the few-row product, kernels/
// fewrows.h), or float32 packed [ceil(n_rows / 16), K, 16] (csmd.kernels.pack_panels: the panel GEMM).
//
// causal_conv_step: x float32 [B, T, C] after the state [B, kernel - stride, C] of the inputs before it (post-
// ELU; absent when kernel == stride); w holds [n, kernel * C] (taps major). Returns y [B, T', n] (+ bias,
// + residual [B, T', n]) and the new state: the last kernel - stride inputs. As csmd/audio/mimi/seanet.py's
// CausalConv1d.
std::vector<mx::array> causal_conv_step(const mx::array& x, const std::optional<mx::array>& state,
                                        const mx::array& w, int n, const std::optional<mx::array>& bias,
                                        const std::optional<mx::array>& residual, int kernel, int stride,
                                        bool elu_input, mx::StreamOrDevice s = {});

// conv_transpose_step: kernel 2 * stride, trimmed causally; x float32 [B, T, C], state [B, 1, stride, n] (the
// previous step's overlapping outputs), w holds [(tap, n), C]. Returns y [B, T * stride, n] (+ bias) and the
// new state. As seanet.py's CausalConvTranspose1d.
std::vector<mx::array> conv_transpose_step(const mx::array& x, const mx::array& state, const mx::array& w, int n,
                                           const std::optional<mx::array>& bias, int stride, bool elu_input,
                                           mx::StreamOrDevice s = {});

class SeanetConv : public mx::Primitive {
 public:
  SeanetConv(mx::Stream stream, SeanetConvConfig cfg) : mx::Primitive(stream), cfg_(cfg) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "CsmdSeanetConv"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  SeanetConvConfig cfg_;
};

}  // namespace csmd
