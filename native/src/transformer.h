// Fused token step through a stack of Llama layers (the backbone, CSM's depth decoder), for one row or several.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace csmd {

namespace mx = mlx::core;

// At most this many rows in one batched step (one per session advanced together).
constexpr int kMaxBatchRows = 64;

struct StepConfig {
  int num_heads = 0;
  int num_kv_heads = 0;
  float eps = 1e-5f;
  int group_size = 64;
  int bits = 4;  // 0: float32 weights, 16: bfloat16 weights
  int num_layers = 0;
};

// One row of a step over several rows: its own cache [L, KVH, T, D], read below `position`, float32 or (bf16)
// bfloat16.
struct StackRow {
  const void* cache_k = nullptr;
  const void* cache_v = nullptr;
  int T = 0;
  int position = 0;
  bool bf16 = false;
};

// bits 0: float32 weights, 16: bfloat16 weights (one array per projection); 4/8: (w, scales, biases).
inline bool float_weights(int bits) { return bits == 0 || bits == 16; }

// One projection of a stack: w [out, in] (float32/bfloat16), or packed w with scales and biases.
struct Proj {
  const mx::array* w = nullptr;
  const mx::array* s = nullptr;
  const mx::array* b = nullptr;
  int in = 0, out = 0;
};

struct LayerWeights {
  const mx::array* sa_norm = nullptr;
  Proj q, k, v, o;
  const mx::array* mlp_norm = nullptr;
  Proj w1, w3, w2;
};

// Throws std::invalid_argument ("<who>: ...") unless `weights` is a stack of L layers in the order
// transformer_step takes them (see bindings.cpp) with these dimensions.
void validate_stack(const std::vector<mx::array>& weights, int L, int H, int num_heads, int num_kv_heads, int D,
                    int group_size, int bits, const std::string& who);
// Throws std::invalid_argument("<name>...") unless (w, scales, biases) is an MLX affine-quantized [out, in]
// matrix (out < 0: any).
void check_quantized(const mx::array& w, const mx::array& scales, const mx::array& biases, int out, int in,
                     int group_size, int bits, const std::string& name);
// Views of a validated stack's weights, which start at arrays[first].
std::vector<LayerWeights> parse_stack(const std::vector<mx::array>& arrays, size_t first, int L, int H, int bits);
// B tokens through the layers, row b at rows[b].position over its own cache: h [B, H] in place (the last
// layer's output, before the final norm). Writes each row's keys/values of its position to new_k/new_v
// [B, L, KVH, D] (rounded to bfloat16 for a row whose cache is bfloat16: see run_stack). Each weight is read
// once for all B rows, and row b's result is the same bits as a step of row b alone (B = 1): every product runs
// the one-row kernel per row, attention runs per row.
void run_stack(const std::vector<LayerWeights>& layers, const StepConfig& cfg, int B, float* h, int H,
               const StackRow* rows, int D, const float* inv_freqs, float* new_k, float* new_v);
// y[M, out] = x[M, in] W^T for a quantized, bfloat16 or float32 projection, threaded: each weight read once
// for all M rows, each row through the one-row kernel (the same bits as M one-row products).
void project(const Proj& p, const float* x, int M, float* y, int group_size, int bits);
// out = x / rms(x) * scale (scale float32/bfloat16/float16 [H]).
void rmsnorm(const float* x, const mx::array& scale, float eps, int H, float* out);

// Returns (h, new_k, new_v): the stack's output and the keys/values of `position`, [layers, kv heads, head_dim];
// the cache is only read. See bindings.cpp for the contract.
std::vector<mx::array> transformer_step(const mx::array& x, const std::vector<mx::array>& weights,
                                        const mx::array& cache_k, const mx::array& cache_v,
                                        int position, const mx::array& inv_freqs, int num_heads,
                                        int num_kv_heads, float eps, int group_size, int bits,
                                        mx::StreamOrDevice s = {});
// The same for B rows of x [B, hidden], row b at positions[b] over its own cache caches_k[b] / caches_v[b]
// [layers, kv heads, T_b, head_dim]: (h [B, hidden], new_k, new_v [B, layers, kv heads, head_dim]).
std::vector<mx::array> transformer_step_batch(const mx::array& x, const std::vector<mx::array>& weights,
                                              const std::vector<mx::array>& caches_k,
                                              const std::vector<mx::array>& caches_v,
                                              const std::vector<int>& positions, const mx::array& inv_freqs,
                                              int num_heads, int num_kv_heads, float eps, int group_size, int bits,
                                              mx::StreamOrDevice s = {});

// Inputs: x [B, H], inv_freqs, the B keys caches, the B values caches, then the weights. Outputs h [B, H] and
// the new rows, [B, L, KVH, D] or, for the one-row transformer_step, [L, KVH, D] (the same bytes).
class TransformerStep : public mx::Primitive {
 public:
  TransformerStep(mx::Stream stream, StepConfig cfg, std::vector<int> positions, bool batch_shape)
      : mx::Primitive(stream), cfg_(cfg), positions_(std::move(positions)), batch_shape_(batch_shape) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "CsmdTransformerStep"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  StepConfig cfg_;
  std::vector<int> positions_;  // one per row
  bool batch_shape_;            // new rows shaped [B, L, KVH, D] (else [L, KVH, D], B = 1)
};

}  // namespace csmd
