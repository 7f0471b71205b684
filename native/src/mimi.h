// Mimi's codec transformer (encoder or decoder stack) for a few streaming steps, as one primitive.
#pragma once

#include <optional>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

struct MimiStackConfig {
  int num_layers = 0;
  int num_heads = 0;
  int context = 0;  // each step attends to itself and the context - 1 steps before it
  float eps = 1e-5f;
};

// Weights per layer, in this order (kMimiWeightsPerLayer): norm1 weight, norm1 bias, in_proj [3D, D],
// out_proj [D, D], layer_scale_1, norm2 weight, norm2 bias, fc1 [F, D], fc2 [D, F], layer_scale_2.
// Projections float32 or bfloat16 (computed in fp32; kernels/fewrows.h), or float32 packed in panels
// [ceil(N / 16), K, 16] (kernels/panel_gemm.h, the faster for many rows), the rest float32 [D].
constexpr int kMimiWeightsPerLayer = 10;

// Returns (y [B, T, D], the new steps' keys and values [L, B, T, D]); see bindings.cpp for the contract. The
// pasts are rings [L, B, P, D] (the step at position p in slot p mod P); mimi_ring_write adds steps to them.
// `position`: int32 [B], batch row b's steps at position[b] ... position[b] + T - 1 (one int32: every row's).
std::vector<mx::array> mimi_transformer(const mx::array& x, const std::vector<mx::array>& weights,
                                        const mx::array& past_k, const mx::array& past_v,
                                        const mx::array& position, const mx::array& inv_freqs, int num_heads,
                                        int context, float eps, mx::StreamOrDevice s = {});

class MimiTransformer : public mx::Primitive {
 public:
  MimiTransformer(mx::Stream stream, MimiStackConfig cfg) : mx::Primitive(stream), cfg_(cfg) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "CsmdMimiTransformer"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  MimiStackConfig cfg_;
};

// ring [L, B, P, D] with the rows [L, B, T, D] of the steps from int32 `position` on written to their slots,
// (position[b] + t) mod P for batch row b (the last P of them; one position: every row's). In place when MLX donates the ring's buffer: the ring's owner
// let go of it, and nothing else reads it.
mx::array mimi_ring_write(const mx::array& ring, const mx::array& rows, const mx::array& position,
                          mx::StreamOrDevice s = {});

class MimiRingWrite : public mx::UnaryPrimitive {
 public:
  explicit MimiRingWrite(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdMimiRingWrite"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

// x float32 [..., K] @ W.T (+ bias) -> [..., n] for W [n, K] packed as kernels/panel_gemm.h describes:
// wp float32 [ceil(n / 16), K, 16]; bias float32 [n] or an empty optional. For SEANet's convolutions.
mx::array panel_matmul(const mx::array& x, const mx::array& wp, int n, const std::optional<mx::array>& bias,
                       mx::StreamOrDevice s = {});

// The causal convolution of x float32 [B, L, C] (its left context already prepended) with kernel k and
// stride s, as panel_matmul of its windows without unfolding them: W [n, k C] packed as for panel_matmul
// (taps major, as CausalConv1d lays them out) -> [B, (L - k) / s + 1, n].
mx::array panel_conv(const mx::array& x, const mx::array& wp, int n, const std::optional<mx::array>& bias,
                     int kernel, int stride, mx::StreamOrDevice s = {});

class PanelMatmul : public mx::UnaryPrimitive {
 public:
  // kernel 0: a plain product; else a convolution with that kernel and stride (see panel_conv).
  PanelMatmul(mx::Stream stream, int n, int kernel = 0, int stride = 1)
      : mx::UnaryPrimitive(stream), n_(n), kernel_(kernel), stride_(stride) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdPanelMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const PanelMatmul&>(other);
    return n_ == o.n_ && kernel_ == o.kernel_ && stride_ == o.stride_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int n_, kernel_, stride_;
};

// ELU (alpha 1) of float32 x, any shape: kernels/elu.h.
mx::array elu(const mx::array& x, mx::StreamOrDevice s = {});

class Elu : public mx::UnaryPrimitive {
 public:
  explicit Elu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdElu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

}  // namespace csmd
