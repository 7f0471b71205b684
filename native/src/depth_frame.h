// CSM's depth decoder for a whole frame as one primitive: codebooks 1..C from the backbone's state and code 0.
//
// Per codebook the decoder runs one step through its stack, the final norm, that codebook's head, the
// sampling rule, and the embedding + projection of the picked code, which is the next step's input. As MLX
// ops that is ~40 small ops per codebook (~1200 a frame, each with dispatch overhead); here it is one call.
// The random part of sampling comes in as Gumbel noise drawn by MLX, so the rule is the same as csmd's
// reference sampler: argmax(filtered logits / temperature + noise).
#pragma once

#include <utility>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "transformer.h"

namespace csmd {

namespace mx = mlx::core;

struct SamplingRule {
  float temperature = 0.f;  // 0: greedy (the noise is not read)
  int top_k = 0;            // 0: off
  float top_p = 1.f;        // 1: off
  float min_p = 0.f;        // 0: off
  int codebook_size = 0;    // ids >= this are never picked (the vocabulary's reserved ids)

  bool operator==(const SamplingRule&) const = default;
};

struct DepthFrameConfig {
  StepConfig step;
  int codebooks = 0;               // C: the frame's codebooks after codebook 0
  int vocab = 0;                   // V: logits per codebook (audio vocabulary)
  int embed_dim = 0;               // E: audio embedding width (the backbone's hidden size)
  std::vector<SamplingRule> rules;  // one per row (B of them)
  bool batch_shape = false;         // codes shaped [B, C] (else [C], B = 1)
  int stack_arrays = 0, head_arrays = 0, embedding_arrays = 0, projection_arrays = 0;
};

// x0: float32 [2, H], the decoder's first two rows (projected backbone state, projected code-0 embedding).
// stack: as for transformer_step. norm: the decoder's final RMSNorm scale [H].
// heads: bits 4/8: (w [C, V, H*bits/32] uint32, scales, biases [C, V, H/G]); bits 0/16: one float32/bfloat16
//   [C, H, V] array (Sesame's layout, logits = h @ heads[k]).
// embeddings: the audio embedding table, rows [C + 1 codebooks * V]: (w, scales, biases) or one float array
//   [rows, E]. projection: E -> H, (w, scales, biases) or one float [H, E] array.
// noise: float32 [C, V] Gumbel noise, one row per codebook (shape [0] allowed when temperature is 0).
// Returns the codes of codebooks 1..C, int32 [C].
//
// Both are B = 1 of one frame over B rows: every step, head and projection reads each weight once for all
// rows, and row b's codes are the same as a frame of row b alone.
mx::array depth_frame(const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs,
                      const mx::array& norm, const std::vector<mx::array>& heads,
                      const std::vector<mx::array>& embeddings, const std::vector<mx::array>& projection,
                      const mx::array& noise, int num_heads, int num_kv_heads, float eps, int group_size, int bits,
                      const SamplingRule& rule, mx::StreamOrDevice s = {});
// The frame for B rows (1 to 64): x0 float32 [B, 2, H], noise float32 [B, C, V] (shape [0] allowed when every
// rule is greedy), one sampling rule per row. Returns int32 [B, C].
mx::array depth_frame_batch(const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs,
                            const mx::array& norm, const std::vector<mx::array>& heads,
                            const std::vector<mx::array>& embeddings, const std::vector<mx::array>& projection,
                            const mx::array& noise, int num_heads, int num_kv_heads, float eps, int group_size,
                            int bits, const std::vector<SamplingRule>& rules, mx::StreamOrDevice s = {});

// Index of the code `rule` picks from `logits` [V] (modified in place) with `noise` [V] (unused if greedy).
int pick_code(float* logits, const float* noise, int V, const SamplingRule& rule);

class DepthFrame : public mx::UnaryPrimitive {
 public:
  DepthFrame(mx::Stream stream, DepthFrameConfig cfg) : mx::UnaryPrimitive(stream), cfg_(std::move(cfg)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdDepthFrame"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  DepthFrameConfig cfg_;
};

}  // namespace csmd
