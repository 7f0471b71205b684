// Fused single-token step through a stack of Llama layers (CSM's depth decoder).
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

struct StepConfig {
  int position = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  float eps = 1e-5f;
  int group_size = 64;
  int bits = 4;  // 0: float32 weights, 16: bfloat16 weights
  int num_layers = 0;
};

// Returns (h, new_k, new_v): the stack's output and the keys/values of `position`, [layers, kv heads, head_dim];
// the cache is only read. See bindings.cpp for the contract.
std::vector<mx::array> transformer_step(const mx::array& x, const std::vector<mx::array>& weights,
                                        const mx::array& cache_k, const mx::array& cache_v,
                                        int position, const mx::array& inv_freqs, int num_heads,
                                        int num_kv_heads, float eps, int group_size, int bits,
                                        mx::StreamOrDevice s = {});

class TransformerStep : public mx::Primitive {
 public:
  TransformerStep(mx::Stream stream, StepConfig cfg) : mx::Primitive(stream), cfg_(cfg) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "CsmdTransformerStep"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  StepConfig cfg_;
};

}  // namespace csmd
