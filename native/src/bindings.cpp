// Python bindings of csmd_native (nanobind, NB_DOMAIN mlx).
#include <atomic>
#include <chrono>
#include <new>
#include <stdexcept>
#include <thread>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "activations.h"
#include "attention.h"
#include "depth_frame.h"
#include "matmul.h"
#include "mimi.h"
#include "qmatmul.h"
#include "seanet.h"
#include "state.h"
#include "transformer.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

NB_MODULE(_ext, m) {
  m.doc() = "Native CPU kernels for csmd (MLX extension)";
  m.attr("mlx_version") = CSMD_MLX_VERSION;

  m.def("quantized_matmul", &csmd::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "stream"_a = nb::none(),
        "x @ dequantize(w, scales, biases).T for MLX's affine layout (transpose=True).\n\n"
        "Same result as mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=...,\n"
        "bits=...) on the CPU.  bits 4 or 8, group_size 32/64/128, x float32/bfloat16/float16\n"
        "with any leading dims; the output has x's dtype.  Single rows use the matvec mode set by\n"
        "set_matvec_mode ('auto' by default: see get_effective_matvec_mode); more than 64 rows the\n"
        "prefill mode set by set_prefill_mode (bf16 or fp32; see get_effective_prefill_mode).");

  m.def("matmul", &csmd::matmul, "x"_a, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x @ w.T for bfloat16 or float32 weights w [out, in] (Linear layout), in fp32.\n\n"
        "x float32/bfloat16/float16 with any leading dims; the output has x's dtype.  Up to 8 rows\n"
        "read every weight row once for all rows (threaded over output features); more rows go through\n"
        "a blocked GEMM: bf16 weights in the prefill mode (set_prefill_mode), fp32 ones in fp32.");

  m.def("causal_softmax", &csmd::causal_softmax, "scores"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Softmax of prefill attention scores [..., T, S] (S >= T) under the causal mask aligned to the\n"
        "last key: in each block of T rows, row i sees keys 0 .. S - T + i and is 0 past them.\n"
        "Computed in fp32 across the thread pool; the output has the scores' dtype.");

  m.def("swiglu", &csmd::swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up = gate * sigmoid(gate) * up for float32 arrays of one shape, across the thread pool\n"
        "(the sigmoid from a polynomial exp, within a few float32 ulps).");

  m.def("cpu_features", []() {
    nb::dict d;
#if defined(__x86_64__) || defined(_M_X64)
    d["arch"] = "x86_64";
#elif defined(__aarch64__)
    d["arch"] = "aarch64";
#else
    d["arch"] = "other";
#endif
    d["avx2"] = csmd::cpu_has_avx2();
#if defined(__x86_64__)
    d["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
#else
    d["fma"] = false;
#endif
    d["avx512vnni"] = csmd::cpu_has_avx512vnni();
    d["avx512bf16"] = csmd::cpu_has_avx512bf16();
    d["neon"] = csmd::cpu_has_neon();
    d["variant"] = csmd::variant_name(csmd::current_variant());
    d["best_variant"] = csmd::variant_name(csmd::best_variant());
    return d;
  });
  m.def("set_variant", &csmd::set_variant, "name"_a,
        "Select the kernel variant: 'auto', 'scalar', 'avx2', 'avx512vnni' (AVX2 with VNNI int16 dot products)\n"
        "or 'neon'.");
  m.def("set_matvec_mode", &csmd::set_matvec_mode, "mode"_a,
        "Single-row products: 'auto' (default: int8 on the avx2 and avx512vnni variants, else int16), 'int16' (x\n"
        "quantized per group to int16, integer dot products, ~2e-5 relative error), 'int8' (int8 x for\n"
        "4-bit weights: ~0.6% per product, faster where a SIMD kernel exists) or 'exact' (float unpacking).");
  m.def("get_matvec_mode", []() { return std::string(csmd::matvec_mode_name()); });
  m.def("get_effective_matvec_mode", []() { return std::string(csmd::effective_matvec_mode_name()); },
        "The mode single-row products use now: 'auto' resolved for the current variant.");
  m.def("set_prefill_mode", &csmd::set_prefill_mode, "mode"_a,
        "Many-row products of quantized and bf16 weights (a prefill): 'auto' (default: 'bf16' where the\n"
        "kernels have the bf16 GEMM, the avx512vnni variant on a CPU with AVX-512 BF16, else 'fp32'), 'bf16'\n"
        "(x and the weights rounded to bf16, fp32 sums; a ValueError where the kernels lack it) or 'fp32'.");
  m.def("get_prefill_mode", []() { return std::string(csmd::prefill_mode_name()); });
  m.def("get_effective_prefill_mode", []() { return std::string(csmd::effective_prefill_mode_name()); },
        "What many-row products of quantized and bf16 weights use now: 'bf16' or 'fp32'.");
  m.def(
      "_pool_roundtrip_us",
      [](int iters) {
        auto& p = csmd::pool();
        const std::function<void(int, int)> noop = [](int, int) {};
        p.run(noop);
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) p.run(noop);
        const std::chrono::duration<double, std::micro> dt = std::chrono::steady_clock::now() - t0;
        return dt.count() / std::max(1, iters);
      },
      "iters"_a = 10000, "Mean time of a no-op job on the thread pool (wake-up and barrier), in us.");
  m.def(
      "_pool_fault",
      [](const std::string& job, const std::string& error) {
        // Test hook: a pool job whose parts on worker threads throw `error`; the caller must rethrow it.
        if (job != "run" && job != "chunks") throw std::invalid_argument("_pool_fault: job is 'run' or 'chunks'");
        if (error != "bad_alloc" && error != "runtime_error")
          throw std::invalid_argument("_pool_fault: error is 'bad_alloc' or 'runtime_error'");
        auto& p = csmd::pool();
        if (p.size() < 2) throw std::invalid_argument("_pool_fault: needs a pool of 2 or more threads");
        const auto caller = std::this_thread::get_id();
        auto fail = [&] {
          if (error == "bad_alloc") throw std::bad_alloc();
          throw std::runtime_error("_pool_fault: a worker's chunk failed");
        };
        if (job == "run") {
          const std::function<void(int, int)> part = [&](int i, int) {
            if (i != 0) fail();  // every worker runs its part of a plain job
          };
          p.run(part);
          return;
        }
        // Chunks go to whichever threads come: the caller's wait in its chunks until a worker has taken one
        // (it will: the caller holds the job open meanwhile), so that a worker's chunk does throw.
        std::atomic<bool> worker_came{false};
        const std::function<void(int)> chunk = [&](int) {
          if (std::this_thread::get_id() != caller) {
            worker_came = true;
            fail();
          }
          const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
          while (!worker_came && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
        };
        p.run_chunks(4 * p.size(), chunk);
      },
      "job"_a, "error"_a,
      "Test hook: run a pool job ('run' or 'chunks') whose parts on worker threads throw 'bad_alloc' or\n"
      "'runtime_error'; the exception must come back here (MemoryError or RuntimeError).");
  m.def("num_threads", &csmd::num_threads);
  m.def("set_num_threads", &csmd::set_num_threads, "n"_a);
  m.def(
      "depth_frame",
      [](const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs, const mx::array& norm,
         const std::vector<mx::array>& heads, const std::vector<mx::array>& embeddings,
         const std::vector<mx::array>& projection, const mx::array& noise, int num_heads, int num_kv_heads, float eps,
         int group_size, int bits, float temperature, int top_k, float top_p, float min_p, int codebook_size,
         mx::StreamOrDevice s) {
        const csmd::SamplingRule rule{temperature, top_k, top_p, min_p, codebook_size};
        return csmd::depth_frame(x0, stack, inv_freqs, norm, heads, embeddings, projection, noise, num_heads,
                                 num_kv_heads, eps, group_size, bits, rule, s);
      },
      "x0"_a, "stack"_a, "inv_freqs"_a, "norm"_a, "heads"_a, "embeddings"_a, "projection"_a, "noise"_a,
      "num_heads"_a, "num_kv_heads"_a, "eps"_a, "group_size"_a, "bits"_a, nb::kw_only(), "temperature"_a,
      "top_k"_a = 0, "top_p"_a = 1.0f, "min_p"_a = 0.0f, "codebook_size"_a, "stream"_a = nb::none(),
      "CSM's depth decoder for one frame: codebooks 1..C as int32 [C], as one primitive.\n\n"
      "x0: float32 [2, hidden] (the projected backbone state and the projected embedding of code 0).\n"
      "stack: the decoder's layers as for transformer_step; norm: its final RMSNorm scale.\n"
      "heads: bits 4/8: (w, scales, biases) of [C, vocab, hidden] quantized along hidden; bits 0/16: one\n"
      "float32/bfloat16 [C, hidden, vocab] array (logits = h @ heads[k]).\n"
      "embeddings: the audio embedding table [(C + 1) * vocab, E] (quantized or float); projection: E -> hidden.\n"
      "noise: float32 [C, vocab] Gumbel noise (ignored when temperature is 0). Per codebook: ids >= codebook_size\n"
      "are masked, logits / temperature, top-k (ties kept), min-p, top-p, then argmax(logits + noise).");
  m.def(
      "depth_frame_batch",
      [](const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs, const mx::array& norm,
         const std::vector<mx::array>& heads, const std::vector<mx::array>& embeddings,
         const std::vector<mx::array>& projection, const mx::array& noise, int num_heads, int num_kv_heads, float eps,
         int group_size, int bits, const std::vector<float>& temperature, const std::vector<int>& top_k,
         const std::vector<float>& top_p, const std::vector<float>& min_p, const std::vector<int>& codebook_size,
         mx::StreamOrDevice s) {
        const size_t B = temperature.size();
        if (top_k.size() != B || top_p.size() != B || min_p.size() != B || codebook_size.size() != B)
          throw std::invalid_argument(
              "depth_frame_batch: temperature, top_k, top_p, min_p and codebook_size must be lists of one length "
              "(the rows), got " +
              std::to_string(B) + ", " + std::to_string(top_k.size()) + ", " + std::to_string(top_p.size()) + ", " +
              std::to_string(min_p.size()) + " and " + std::to_string(codebook_size.size()));
        std::vector<csmd::SamplingRule> rules;
        for (size_t b = 0; b < B; ++b)
          rules.push_back({temperature[b], top_k[b], top_p[b], min_p[b], codebook_size[b]});
        return csmd::depth_frame_batch(x0, stack, inv_freqs, norm, heads, embeddings, projection, noise, num_heads,
                                       num_kv_heads, eps, group_size, bits, rules, s);
      },
      "x0"_a, "stack"_a, "inv_freqs"_a, "norm"_a, "heads"_a, "embeddings"_a, "projection"_a, "noise"_a,
      "num_heads"_a, "num_kv_heads"_a, "eps"_a, "group_size"_a, "bits"_a, nb::kw_only(), "temperature"_a, "top_k"_a,
      "top_p"_a, "min_p"_a, "codebook_size"_a, "stream"_a = nb::none(),
      "depth_frame for B rows (1 to 64) at once, each weight read once for all of them: int32 [B, C].\n\n"
      "x0: float32 [B, 2, hidden]; noise: float32 [B, C, vocab] (shape [0] allowed when every row is greedy);\n"
      "temperature, top_k, top_p, min_p, codebook_size: one value per row (a row with temperature 0 is\n"
      "greedy). Row b's codes are bit for bit what depth_frame returns for row b alone.");
  m.def(
      "mimi_transformer",
      [](const mx::array& x, const std::vector<mx::array>& weights, const mx::array& past_k,
         const mx::array& past_v, const mx::array& position, const mx::array& inv_freqs, int num_heads,
         int context, float eps, mx::StreamOrDevice s) {
        auto r = csmd::mimi_transformer(x, weights, past_k, past_v, position, inv_freqs, num_heads, context, eps, s);
        return nb::make_tuple(r[0], r[1], r[2]);
      },
      "x"_a, "weights"_a, "past_k"_a, "past_v"_a, "position"_a, "inv_freqs"_a, "num_heads"_a, "context"_a,
      "eps"_a = 1e-5f, nb::kw_only(), "stream"_a = nb::none(),
      "Mimi's transformer stack (LayerNorm, interleaved RoPE, windowed attention, LayerScale, GELU MLP)\n"
      "for the T steps of x: float32 [B, T, D]; batch row b's from position[b] on (int32 [B], or one int32\n"
      "for every row: each row is a stream at its own position).\n\n"
      "weights: 10 per layer: norm1 weight, norm1 bias, in_proj [3D, D], out_proj [D, D], layer_scale_1,\n"
      "norm2 weight, norm2 bias, fc1 [F, D], fc2 [D, F], layer_scale_2 (projections float32 or bfloat16, or\n"
      "float32 packed in panels as for panel_matmul: [ceil(N / 16), K, 16], multiplied by the panel GEMM).\n"
      "past_k/past_v: float32 [layers, B, context - 1, D], the keys/values of the steps before `position`,\n"
      "as rings: the step at position p in slot p mod (context - 1).\n"
      "Returns (y, new_k, new_v), new_k/new_v float32 [layers, B, T, D] the T steps' keys and values (for\n"
      "mimi_ring_write).  Projections read the weights once for all B * T rows, so this is meant for a few\n"
      "rows (streaming).");
  m.def("mimi_ring_write", &csmd::mimi_ring_write, "ring"_a, "rows"_a, "position"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "ring float32 [L, B, P, D] with rows [L, B, T, D], the steps from int32 `position` on, in their slots\n"
        "(position[b] + t) mod P for batch row b (position int32 [B], or one int32 for every row; the last P\n"
        "steps).  Writes in place when MLX can donate the ring's buffer.");
  m.def("panel_matmul", &csmd::panel_matmul, "x"_a, "wp"_a, "n"_a, "bias"_a = nb::none(), nb::kw_only(),
        "stream"_a = nb::none(),
        "x @ W.T (+ bias) for W [n, K] packed in panels of 16 rows: wp[p, k, j] = W[16 p + j, k],\n"
        "float32 [ceil(n / 16), K, 16] (zeros past n).  x float32 [..., K]; for many-row products with\n"
        "constant weights (Mimi's SEANet convolutions).");
  m.def("panel_conv", &csmd::panel_conv, "x"_a, "wp"_a, "n"_a, "bias"_a = nb::none(), "kernel"_a = 1,
        "stride"_a = 1, nb::kw_only(), "stream"_a = nb::none(),
        "A causal convolution of x float32 [B, L, C] (left context included) with `kernel` and `stride`:\n"
        "panel_matmul of each output's window (kernel * C consecutive floats, taps major) without\n"
        "unfolding them.  wp packs W [n, kernel * C] as for panel_matmul.  -> [B, (L - kernel) / stride + 1, n].");
  m.def(
      "causal_conv_step",
      [](const mx::array& x, const std::optional<mx::array>& state, const mx::array& w, int n,
         const std::optional<mx::array>& bias, const std::optional<mx::array>& residual, int kernel, int stride,
         bool elu_input, mx::StreamOrDevice s) {
        auto r = csmd::causal_conv_step(x, state, w, n, bias, residual, kernel, stride, elu_input, s);
        return nb::make_tuple(r[0], r.size() > 1 ? nb::cast(r[1]) : nb::none());
      },
      "x"_a, "state"_a.none(), "w"_a, "n"_a, "bias"_a = nb::none(), "residual"_a = nb::none(), "kernel"_a = 1,
      "stride"_a = 1, "elu_input"_a = false, nb::kw_only(), "stream"_a = nb::none(),
      "One streaming step of a causal convolution (csmd/audio/mimi/seanet.py's CausalConv1d), fused:\n"
      "y = conv([state | elu(x) if elu_input else x]) (+ bias) (+ residual).  x float32 [B, T, C];\n"
      "state float32 [B, kernel - stride, C], None when kernel == stride; w [n, kernel * C] taps major,\n"
      "float32 or bfloat16 as is (a few rows) or packed by csmd.kernels.pack_panels (many rows).\n"
      "-> (y [B, T / stride, n], the new state or None).");
  m.def(
      "conv_transpose_step",
      [](const mx::array& x, const mx::array& state, const mx::array& w, int n, const std::optional<mx::array>& bias,
         int stride, bool elu_input, mx::StreamOrDevice s) {
        auto r = csmd::conv_transpose_step(x, state, w, n, bias, stride, elu_input, s);
        return nb::make_tuple(r[0], r[1]);
      },
      "x"_a, "state"_a, "w"_a, "n"_a, "bias"_a = nb::none(), "stride"_a = 1, "elu_input"_a = false, nb::kw_only(),
      "stream"_a = nb::none(),
      "One streaming step of a causal transposed convolution with kernel 2 * stride (seanet.py's\n"
      "CausalConvTranspose1d), the input's ELU first when elu_input.  x float32 [B, T, C]; state float32\n"
      "[B, 1, stride, n]; w [(tap, n), C] as causal_conv_step's.  -> (y [B, T * stride, n], the new state).");
  m.def("elu", &csmd::elu, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "ELU (alpha 1) of float32 x: x where x > 0, exp(x) - 1 elsewhere (exp within 1e-7 relative).");
  m.def(
      "transformer_step",
      [](const mx::array& x, const std::vector<mx::array>& weights, const mx::array& cache_k,
         const mx::array& cache_v, int position, const mx::array& inv_freqs, int num_heads,
         int num_kv_heads, float eps, int group_size, int bits, mx::StreamOrDevice s) {
        auto r = csmd::transformer_step(x, weights, cache_k, cache_v, position, inv_freqs, num_heads,
                                        num_kv_heads, eps, group_size, bits, s);
        return nb::make_tuple(r[0], r[1], r[2]);
      },
      "x"_a, "weights"_a, "cache_k"_a, "cache_v"_a, "position"_a, "inv_freqs"_a, "num_heads"_a,
      "num_kv_heads"_a, "eps"_a = 1e-5f, "group_size"_a = 64, "bits"_a = 4, nb::kw_only(),
      "stream"_a = nb::none(),
      "One token through all layers of a Llama stack (pre-norm, SwiGLU, interleaved RoPE, GQA).\n\n"
      "x: float32 [1, hidden]; cache_k/cache_v: float32 or bfloat16 [layers, kv_heads, max_len, head_dim]\n"
      "(bfloat16: widened to float32 as read);\n"
      "weights per layer: sa_norm, q, k, v, o, mlp_norm, w1, w3, w2 with every projection given as\n"
      "(w, scales, biases) when bits is 4 or 8, one float32 [out, in] array when bits == 0, or one\n"
      "bfloat16 [out, in] array when bits == 16 (computed in fp32; group_size is ignored for 0 and 16).\n"
      "Norm scales may be float32, bfloat16 or float16.\n"
      "The cache is read (positions < position); returns (h before the final norm, new_k, new_v) where\n"
      "new_k/new_v [layers, kv_heads, head_dim] are this position's keys/values, for the caller to store,\n"
      "in the cache's dtype. A bfloat16 cache's new rows are rounded to bfloat16 before this step's own\n"
      "attention too: the position reads the same to its own query as to every later one's.");
  m.def(
      "transformer_step_batch",
      [](const mx::array& x, const std::vector<mx::array>& weights, const std::vector<mx::array>& caches_k,
         const std::vector<mx::array>& caches_v, const std::vector<int>& positions, const mx::array& inv_freqs,
         int num_heads, int num_kv_heads, float eps, int group_size, int bits, mx::StreamOrDevice s) {
        auto r = csmd::transformer_step_batch(x, weights, caches_k, caches_v, positions, inv_freqs, num_heads,
                                              num_kv_heads, eps, group_size, bits, s);
        return nb::make_tuple(r[0], r[1], r[2]);
      },
      "x"_a, "weights"_a, "caches_k"_a, "caches_v"_a, "positions"_a, "inv_freqs"_a, "num_heads"_a,
      "num_kv_heads"_a, "eps"_a = 1e-5f, "group_size"_a = 64, "bits"_a = 4, nb::kw_only(),
      "stream"_a = nb::none(),
      "transformer_step for B rows (1 to 64) at once, each weight read once for all of them.\n\n"
      "x: float32 [B, hidden]; row b is at positions[b] over its own caches_k[b] / caches_v[b], float32\n"
      "or bfloat16 (one dtype for all rows) [layers, kv_heads, T_b, head_dim] (T_b may differ between\n"
      "rows); weights as for transformer_step.\n"
      "Returns (h [B, hidden], new_k, new_v [B, layers, kv_heads, head_dim]); row b is bit for bit what\n"
      "transformer_step returns for row b alone.");
}
