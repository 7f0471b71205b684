// SEANet's streaming convolutions (Mimi's codec), one primitive per convolution with its surroundings fused in.
//
// csmd/audio/mimi/seanet.py is the reference and says what each layer computes. As separate MLX ops, the ELUs,
// the concatenation of each convolution's state with its input, the bias and residual sums and the transposed
// convolutions' overlap-add were each a pass over the activations (up to 1920 x 64 floats a decoded frame,
// 72000 x 64 for 3 s offline) into a fresh buffer. Here they happen in the buffers that the products read and
// write, and the products are the same kernels as before (fewrows.h for a few rows, panel_gemm.h for many), so
// the results are the same floats (BENCHMARKS.md, "Fifth session", has the time saved).
//
// Each batch row is a stream of its own (Mimi's batched decode): every step gives a row the floats it gives
// that stream alone. The products are per-row exact (fewrows.h, panel_gemm.h's tiles), and the ELUs run per
// row, so the pool's split of a row's values does not move with the batch size.
#include "seanet.h"

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "kernels/elu.h"
#include "kernels/panel_gemm.h"
#include "matmul.h"
#include "state.h"

namespace csmd {

namespace {

// A scratch buffer left uninitialized: every one here is written in full before it is read, and zeroing the
// up to 1 MB of a frame's largest cost more than the pass that fills it.
std::unique_ptr<float[]> scratch(size_t n) { return std::make_unique_for_overwrite<float[]>(n); }

// out[M, N] = (row m of K floats at x + m * ldx) @ W.T (+ bias) (+ residual [M, N]), W as the weight array
// holds it.
void product(const mx::array& w, const float* x, int M, int K, size_t ldx, int N, const float* bias,
             const float* residual, float* out) {
  if (M == 0) return;
  if (w.ndim() == 2) {  // as is: the few-row product, which reads its rows side by side
    std::unique_ptr<float[]> rows;
    if (ldx != static_cast<size_t>(K)) {
      rows = scratch(static_cast<size_t>(M) * K);
      for (int m = 0; m < M; ++m) std::memcpy(rows.get() + static_cast<size_t>(m) * K, x + m * ldx, sizeof(float) * K);
      x = rows.get();
    }
    few_rows_product(w, x, M, out);
    for (int m = 0; m < M; ++m)  // (a few rows: these sums cost nothing)
      for (int n = 0; n < N; ++n) {
        const size_t i = static_cast<size_t>(m) * N + n;
        if (bias) out[i] += bias[n];
        if (residual) out[i] = residual[i] + out[i];
      }
    return;
  }
  PanelArgs a;  // packed panels
  a.x = x;
  a.M = M;
  a.K = K;
  a.N = N;
  a.ldx = ldx;
  a.wp = w.data<float>();
  a.bias = bias;
  a.residual = residual;  // added as each tile is stored, while it is in cache, rather than in a pass of its own
  a.out = out;
  panel_product(a, current_variant(), pool());
}

// x (n floats), through the ELU when asked, to out.
void load(const float* x, size_t n, bool elu_input, float* out) {
  if (elu_input)
    elu_pooled(elu_kernel(current_variant()), x, n, out, pool());
  else
    std::memcpy(out, x, sizeof(float) * n);
}

void check_weight(const mx::array& w, int rows, int K, const std::string& fn) {
  const bool as_is = w.ndim() == 2 && w.shape() == mx::Shape{rows, K} &&
                     (w.dtype() == mx::float32 || w.dtype() == mx::bfloat16);
  const bool packed = w.ndim() == 3 && w.dtype() == mx::float32 &&
                      w.shape() == mx::Shape{(rows + kPanel - 1) / kPanel, K, kPanel};
  if (!as_is && !packed)
    throw std::invalid_argument(fn + ": w must be float32 or bfloat16 [" + std::to_string(rows) + ", " +
                                std::to_string(K) + "], or float32 packed [ceil(" + std::to_string(rows) +
                                " / 16), " + std::to_string(K) + ", 16]");
}

void check_bias(const std::optional<mx::array>& bias, int n, const std::string& fn) {
  if (bias && (bias->dtype() != mx::float32 || bias->shape() != mx::Shape{n}))
    throw std::invalid_argument(fn + ": bias must be float32 [n]");
}

// A convolution of one step: per batch, [state | x] in one buffer (ELU'd), the windows read in place.
void conv_eval(const SeanetConvConfig& cfg, std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
  const mx::array &x = ins[0], &w = ins[1];
  int next = 2;
  const mx::array* state = cfg.has_state ? &ins[next++] : nullptr;
  const float* bias = cfg.has_bias ? ins[next++].data<float>() : nullptr;
  const float* residual = cfg.has_residual ? ins[next++].data<float>() : nullptr;
  const int B = x.shape(0), T = x.shape(1), C = x.shape(2), N = cfg.n;
  const int context = cfg.kernel - cfg.stride, L = context + T, M = T / cfg.stride, K = cfg.kernel * C;
  const size_t batch_in = static_cast<size_t>(L) * C, ldx = static_cast<size_t>(cfg.stride) * C;
  const auto inputs = scratch(static_cast<size_t>(B) * batch_in);
  const size_t past = static_cast<size_t>(context) * C;  // floats of state per batch
  for (int b = 0; b < B; ++b) {
    float* e = inputs.get() + b * batch_in;
    if (context) std::memcpy(e, state->data<float>() + b * past, sizeof(float) * past);
    load(x.data<float>() + static_cast<size_t>(b) * T * C, static_cast<size_t>(T) * C, cfg.elu_input, e + past);
    if (context) std::memcpy(outs[1].data<float>() + b * past, e + static_cast<size_t>(T) * C, sizeof(float) * past);
  }
  float* y = outs[0].data<float>();
  if (w.ndim() == 2 && B > 1) {  // the few-row product, once for every batch's windows
    const auto windows = scratch(static_cast<size_t>(B) * M * K);
    for (int b = 0; b < B; ++b)
      for (int m = 0; m < M; ++m)
        std::memcpy(windows.get() + (static_cast<size_t>(b) * M + m) * K, inputs.get() + b * batch_in + m * ldx,
                    sizeof(float) * K);
    product(w, windows.get(), B * M, K, K, N, bias, residual, y);
  } else {
    for (int b = 0; b < B; ++b) {
      const size_t offset = static_cast<size_t>(b) * M * N;
      product(w, inputs.get() + b * batch_in, M, K, ldx, N, bias, residual ? residual + offset : nullptr, y + offset);
    }
  }
}

// A transposed convolution of one step: output block t is the first half of step t's product plus the second
// half of step t - 1's (the state's for t = 0), plus the bias.
void conv_transpose_eval(const SeanetConvConfig& cfg, std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
  const mx::array &x = ins[0], &w = ins[1], &state = ins[2];
  const float* bias = cfg.has_bias ? ins[3].data<float>() : nullptr;
  const int B = x.shape(0), T = x.shape(1), C = x.shape(2), N = cfg.n, s = cfg.stride;
  const size_t half = static_cast<size_t>(s) * N, rows = static_cast<size_t>(B) * T;
  const auto products = scratch(rows * 2 * half);
  std::unique_ptr<float[]> inputs;
  const float* xs = x.data<float>();
  if (cfg.elu_input) {  // batch row by batch row: the pool splits each as it splits a stream's alone
    inputs = scratch(rows * C);
    const size_t batch_in = static_cast<size_t>(T) * C;
    for (int b = 0; b < B; ++b) load(xs + b * batch_in, batch_in, true, inputs.get() + b * batch_in);
    xs = inputs.get();
  }
  product(w, xs, static_cast<int>(rows), C, C, static_cast<int>(2 * half), nullptr, nullptr, products.get());
  for (int b = 0; b < B; ++b) {
    const float* p = products.get() + static_cast<size_t>(b) * T * 2 * half;
    float* y = outs[0].data<float>() + static_cast<size_t>(b) * T * half;
    for (int t = 0; t < T; ++t) {
      const float* head = p + t * 2 * half;
      const float* overlap = t ? p + (t - 1) * 2 * half + half : state.data<float>() + b * half;
      for (int j = 0; j < s; ++j)  // output step t * s + j: channels n
        for (int c = 0; c < N; ++c) {
          const size_t i = static_cast<size_t>(j) * N + c;
          const float v = head[i] + overlap[i];
          y[t * half + i] = bias ? v + bias[c] : v;
        }
    }
    std::memcpy(outs[1].data<float>() + b * half, p + (T - 1) * 2 * half + half, sizeof(float) * half);
  }
}

}  // namespace

std::vector<mx::array> causal_conv_step(const mx::array& x, const std::optional<mx::array>& state,
                                        const mx::array& w, int n, const std::optional<mx::array>& bias,
                                        const std::optional<mx::array>& residual, int kernel, int stride,
                                        bool elu_input, mx::StreamOrDevice s) {
  const std::string fn = "causal_conv_step";
  auto bad = [&](const std::string& msg) { throw std::invalid_argument(fn + ": " + msg); };
  if (x.dtype() != mx::float32 || x.ndim() != 3) bad("x must be float32 [B, T, C]");
  if (kernel < 1 || stride < 1 || kernel % stride) bad("kernel must be a positive multiple of the stride");
  const int B = x.shape(0), T = x.shape(1), C = x.shape(2), context = kernel - stride;
  if (T < 1 || T % stride) bad("T must be a positive multiple of the stride");
  if (n < 1) bad("n must be positive");
  if (context && !(state && state->dtype() == mx::float32 && state->shape() == mx::Shape{B, context, C}))
    bad("state must be float32 [B, kernel - stride, C]");
  if (!context && state) bad("a convolution with kernel == stride has no state");
  check_weight(w, n, kernel * C, fn);
  check_bias(bias, n, fn);
  const mx::Shape y_shape = {B, T / stride, n};
  if (residual && (residual->dtype() != mx::float32 || residual->shape() != y_shape))
    bad("residual must be float32 [B, T / stride, n]");
  SeanetConvConfig cfg{n, kernel, stride, false, elu_input, context > 0, bias.has_value(), residual.has_value()};
  std::vector<mx::array> inputs = {x, w};
  for (const auto* a : {&state, &bias, &residual})
    if (*a) inputs.push_back(**a);
  auto st = mx::to_stream(s);
  auto prim = std::make_shared<SeanetConv>(st, cfg);
  if (!context) return mx::array::make_arrays({y_shape}, {mx::float32}, prim, inputs);
  return mx::array::make_arrays({y_shape, state->shape()}, {mx::float32, mx::float32}, prim, inputs);
}

std::vector<mx::array> conv_transpose_step(const mx::array& x, const mx::array& state, const mx::array& w, int n,
                                           const std::optional<mx::array>& bias, int stride, bool elu_input,
                                           mx::StreamOrDevice s) {
  const std::string fn = "conv_transpose_step";
  auto bad = [&](const std::string& msg) { throw std::invalid_argument(fn + ": " + msg); };
  if (x.dtype() != mx::float32 || x.ndim() != 3 || x.shape(1) < 1) bad("x must be float32 [B, T, C], T > 0");
  if (stride < 1 || n < 1) bad("stride and n must be positive");
  const int B = x.shape(0), T = x.shape(1), C = x.shape(2);
  if (state.dtype() != mx::float32 || state.shape() != mx::Shape{B, 1, stride, n})
    bad("state must be float32 [B, 1, stride, n]");
  check_weight(w, 2 * stride * n, C, fn);
  check_bias(bias, n, fn);
  SeanetConvConfig cfg{n, 2 * stride, stride, true, elu_input, true, bias.has_value(), false};
  std::vector<mx::array> inputs = {x, w, state};
  if (bias) inputs.push_back(*bias);
  return mx::array::make_arrays({{B, T * stride, n}, state.shape()}, {mx::float32, mx::float32},
                                std::make_shared<SeanetConv>(mx::to_stream(s), cfg), inputs);
}

std::vector<mx::Shape> SeanetConv::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0];
  const int B = x.shape(0), T = x.shape(1);
  if (cfg_.transposed) return {{B, T * cfg_.stride, cfg_.n}, {B, 1, cfg_.stride, cfg_.n}};
  const mx::Shape y = {B, T / cfg_.stride, cfg_.n};
  if (!cfg_.has_state) return {y};
  return {y, {B, cfg_.kernel - cfg_.stride, x.shape(2)}};
}

bool SeanetConv::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SeanetConv&>(other).cfg_;
  const auto& c = cfg_;
  return c.n == o.n && c.kernel == o.kernel && c.stride == o.stride && c.transposed == o.transposed &&
         c.elu_input == o.elu_input && c.has_state == o.has_state && c.has_bias == o.has_bias &&
         c.has_residual == o.has_residual;
}

void SeanetConv::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("csmd_native's SEANet convolutions run on the CPU only");
}

void SeanetConv::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch_cpu(stream(), inputs, outputs, [cfg = cfg_](std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
    if (cfg.transposed)
      conv_transpose_eval(cfg, ins, outs);
    else
      conv_eval(cfg, ins, outs);
  });
}

}  // namespace csmd
