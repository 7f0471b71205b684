// Mimi's transformer stack for a few streaming steps (2 per 80 ms frame), all layers in one primitive.
//
// Per layer (pre-norm, as csmd/audio/mimi/transformer.py, which is the reference):
//   x += ls1 * out_proj(attention(rope(in_proj(layernorm1(x)))))
//   x += ls2 * fc2(gelu(fc1(layernorm2(x))))
// with interleaved RoPE on q and k, and each step attending to itself and the context - 1 steps before it.
// The past keys/values are rings [L, B, P, D] with P = context - 1: the step at position p lives in slot
// p mod P (slots of positions before the stream's start are masked). Each batch row is a stream of its own,
// at its own position (streams that joined a batch at different times): the RoPE angles, the ring slots and
// which of them exist yet are per row, and a row's arithmetic is that of the stream alone (the products are
// fewrows.h's, whose result for a row does not depend on the other rows). The stack's primitive returns the new
// steps' keys and values; MimiRingWrite then writes them into the ring, in place when MLX lets it take
// over the old ring's buffer. A shifted copy of the window instead cost 16 MB of memory traffic a frame.
//
// Why native: at 2 rows the MLX graph of a layer is ~40 small ops whose dispatch costs more than their
// arithmetic, and the projections are bound by reading the weights, which fewrows.h does at close to the
// memory bandwidth.
#include "mimi.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "kernels/elu.h"
#include "kernels/panel_gemm.h"
#include "kernels/strided_rows.h"
#include "matmul.h"
#include "state.h"

namespace csmd {

namespace {

// Inputs of the primitive: x, past_k, past_v, position, inv_freqs, then the weights.
constexpr int kFixedInputs = 5;

void fail(const std::string& msg) { throw std::invalid_argument("mimi_transformer: " + msg); }

bool is_projection(int i) {
  const int j = i % kMimiWeightsPerLayer;
  return j == 2 || j == 3 || j == 7 || j == 8;
}

void layer_norm(const float* x, const float* w, const float* b, float eps, int D, float* out) {
  float mean = 0.f;
  for (int i = 0; i < D; ++i) mean += x[i];
  mean /= static_cast<float>(D);
  float var = 0.f;
  for (int i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float r = 1.f / std::sqrt(var / static_cast<float>(D) + eps);
  for (int i = 0; i < D; ++i) out[i] = (x[i] - mean) * r * w[i] + b[i];
}

// Interleaved rotary embedding of one head vector: pair (2i, 2i+1) turns by the angle whose cosine and sine
// are cs[2i], cs[2i+1] (rope_table: the same for every head and layer, so computed once per call).
void rope(float* v, int head_dim, const float* cs) {
  for (int i = 0; i < head_dim / 2; ++i) {
    const float c = cs[2 * i], s = cs[2 * i + 1];
    const float x0 = v[2 * i], x1 = v[2 * i + 1];
    v[2 * i] = x0 * c - x1 * s;
    v[2 * i + 1] = x1 * c + x0 * s;
  }
}

// The position of batch row b's first step: `positions` holds one int32 per row, or one for every row.
int row_position(const mx::array& positions, int b) {
  return positions.data<int32_t>()[positions.size() == 1 ? 0 : b];
}

// [B, T, head_dim]: (cos, sin) of (position_b + t) * inv_freqs[i] for each pair i, step t of batch row b.
std::vector<float> rope_table(int B, int T, int head_dim, const float* inv_freqs, const mx::array& positions) {
  std::vector<float> cs(static_cast<size_t>(B) * T * head_dim);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      float* row = cs.data() + (static_cast<size_t>(b) * T + t) * head_dim;
      for (int i = 0; i < head_dim / 2; ++i) {
        const float a = static_cast<float>(row_position(positions, b) + t) * inv_freqs[i];
        row[2 * i] = std::cos(a);
        row[2 * i + 1] = std::sin(a);
      }
    }
  return cs;
}

// Whether `position` holds one int32 per batch row, or one for all B rows.
bool valid_positions(const mx::array& position, int B) {
  return position.dtype() == mx::int32 && position.ndim() <= 1 &&
         (position.size() == 1 || position.size() == static_cast<size_t>(B));
}

// out[M, N] = x[M, K] @ W.T for a projection W [N, K] as is (fewrows.h: each weight row read once for all M
// rows) or packed in panels (panel_gemm.h). Either gives a row of x the same floats whatever M: a stream in a
// batch gets what it gets alone.
void project(const mx::array& w, const float* x, int M, int K, int N, float* out) {
  if (w.ndim() == 2) {
    few_rows_product(w, x, M, out);
    return;
  }
  PanelArgs a;
  a.x = x;
  a.M = M;
  a.K = K;
  a.N = N;
  a.ldx = static_cast<size_t>(K);
  a.wp = w.data<float>();
  a.out = out;
  panel_product(a, current_variant(), pool());
}

struct Shapes {
  int L, B, T, P, D, H, hd, F;
};

// Attention of head h of the T new steps of one batch row (at `position`) over its past and themselves;
// q pre-scaled.
// qkv rows hold [q | k | v] of the new steps (after RoPE); out rows get the heads' outputs side by side.
// past_k/past_v: the batch's rings [P, D].
void attend(const Shapes& s, int h, int context, int position, const float* past_k, const float* past_v,
            const float* qkv, float* out, const Kernels& kern, const StridedRowKernels& rows) {
  const int S = s.P + s.T;  // keys: the P past steps, oldest first, then the T new steps
  const int oldest = s.P ? (position % s.P + s.P) % s.P : 0;  // the ring slot of key 0 (position - P)
  const size_t offset = static_cast<size_t>(h) * s.hd;
  // Keys first..last as runs of rows at one stride: the ring from the oldest slot to its end, the ring from
  // slot 0, the new steps in qkv. fn(j0, n, key rows, value rows, stride).
  auto for_runs = [&](int first, int last, auto fn) {
    const int wrap = s.P - oldest;  // key j < wrap is in slot oldest + j, the others in slot j - wrap
    auto run = [&](int j0, int j1, const float* k, const float* v, size_t stride) {
      if (j0 < j1) fn(j0, j1 - j0, k + offset, v + offset, stride);
    };
    const int past_end = std::min(last + 1, s.P);
    const size_t D = s.D;
    run(first, std::min(past_end, wrap), past_k + (oldest + first) * D, past_v + (oldest + first) * D, D);
    const int j0 = std::max(first, wrap);
    run(j0, past_end, past_k + (j0 - wrap) * D, past_v + (j0 - wrap) * D, D);
    const int n0 = std::max(first, s.P);
    const float* fresh = qkv + static_cast<size_t>(n0 - s.P) * 3 * D;
    run(n0, last + 1, fresh + D, fresh + 2 * D, 3 * D);
  };
  std::vector<float> p(S);
  for (int t = 0; t < s.T; ++t) {
    // Key j sits at position - P + j; step t may see it when 0 <= t + P - j < context and it exists.
    const int first = std::max({0, s.P - position, t + s.P - context + 1});
    const int last = t + s.P;  // inclusive
    const float* q = qkv + static_cast<size_t>(t) * 3 * s.D + offset;
    for_runs(first, last, [&](int j0, int n, const float* k, const float*, size_t stride) {
      rows.row_dots(q, k, stride, n, s.hd, p.data() + j0);
    });
    // the variant's SIMD softmax (a polynomial exp): at the full window, 4000 scalar exps a layer cost more
    // than the dot products
    const int n = last - first + 1;
    kern.softmax_row(p.data() + first, n, n, p.data() + first);
    float* o = out + static_cast<size_t>(t) * s.D + offset;
    std::fill(o, o + s.hd, 0.f);
    for_runs(first, last, [&](int j0, int n, const float*, const float* v, size_t stride) {
      rows.weighted_sum(p.data() + j0, v, stride, n, s.hd, o);
    });
  }
}

}  // namespace

std::vector<mx::array> mimi_transformer(const mx::array& x, const std::vector<mx::array>& weights,
                                        const mx::array& past_k, const mx::array& past_v,
                                        const mx::array& position, const mx::array& inv_freqs, int num_heads,
                                        int context, float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() != 3) fail("x must be float32 [B, T, D]");
  const int B = x.shape(0), T = x.shape(1), D = x.shape(2);
  if (weights.empty() || weights.size() % kMimiWeightsPerLayer)
    fail("weights must hold " + std::to_string(kMimiWeightsPerLayer) + " arrays per layer");
  const int L = static_cast<int>(weights.size()) / kMimiWeightsPerLayer;
  if (num_heads <= 0 || D % num_heads || (D / num_heads) % 2) fail("D must split into heads of even size");
  if (context < 1) fail("context must be at least 1");
  const int P = context - 1;
  for (const auto* kv : {&past_k, &past_v})
    if (kv->dtype() != mx::float32 || kv->shape() != mx::Shape{L, B, P, D})
      fail("past keys/values must be float32 [layers, B, context - 1, D]");
  if (!valid_positions(position, B)) fail("position must be int32 [B] (or one int32 for every row)");
  if (inv_freqs.dtype() != mx::float32 || inv_freqs.size() != static_cast<size_t>(D / num_heads / 2))
    fail("inv_freqs must be float32 [head_dim / 2]");
  if (weights[8].ndim() < 2) fail("weight 8 must be a projection");
  const int F = weights[8].shape(1);  // fc2: [D, F] as is, [ceil(D / 16), F, 16] packed
  for (int i = 0; i < static_cast<int>(weights.size()); ++i) {
    const auto& w = weights[i];
    const int j = i % kMimiWeightsPerLayer;
    if (is_projection(i)) {
      const int n = j == 2 ? 3 * D : j == 7 ? F : D, k = j == 8 ? F : D;
      const bool as_is = (w.dtype() == mx::float32 || w.dtype() == mx::bfloat16) && w.shape() == mx::Shape{n, k};
      const bool packed = w.dtype() == mx::float32 && w.shape() == mx::Shape{(n + kPanel - 1) / kPanel, k, kPanel};
      if (!as_is && !packed)
        fail("weight " + std::to_string(i) + " must be a float32 or bfloat16 projection of the layer's shape, " +
             "or a float32 one packed in panels");
    } else if (w.dtype() != mx::float32 || w.size() != static_cast<size_t>(D)) {
      fail("weight " + std::to_string(i) + " must be float32 [D]");
    }
  }
  auto st = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, past_k, past_v, position, inv_freqs};
  for (const auto& w : weights) inputs.push_back(w);
  MimiStackConfig cfg{L, num_heads, context, eps};
  const mx::Shape fresh = {L, B, T, D};
  return mx::array::make_arrays({x.shape(), fresh, fresh}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<MimiTransformer>(st, cfg), inputs);
}

mx::array mimi_ring_write(const mx::array& ring, const mx::array& rows, const mx::array& position,
                          mx::StreamOrDevice s) {
  auto bad = [](const std::string& msg) { throw std::invalid_argument("mimi_ring_write: " + msg); };
  if (ring.dtype() != mx::float32 || ring.ndim() != 4) bad("ring must be float32 [L, B, P, D]");
  if (rows.dtype() != mx::float32 || rows.ndim() != 4 || rows.shape(0) != ring.shape(0) ||
      rows.shape(1) != ring.shape(1) || rows.shape(3) != ring.shape(3))
    bad("rows must be float32 [L, B, T, D] for the ring's L, B and D");
  if (!valid_positions(position, ring.shape(1))) bad("position must be int32 [B] (or one int32 for every row)");
  auto st = mx::to_stream(s);
  // (the ring itself, never a Contiguous node of it: a node sharing its buffer would keep it referenced too
  // long for the donation)
  return mx::array(ring.shape(), mx::float32, std::make_shared<MimiRingWrite>(st), {ring, rows, position});
}

std::vector<mx::Shape> MimiTransformer::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0].shape();
  const mx::Shape fresh = {cfg_.num_layers, x[0], x[1], x[2]};
  return {x, fresh, fresh};
}

bool MimiTransformer::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MimiTransformer&>(other);
  return cfg_.num_layers == o.cfg_.num_layers && cfg_.num_heads == o.cfg_.num_heads &&
         cfg_.context == o.cfg_.context && cfg_.eps == o.cfg_.eps;
}

void MimiTransformer::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("csmd_native.mimi_transformer runs on the CPU only");
}

void MimiTransformer::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch_cpu(stream(), inputs, outputs, [cfg = cfg_](std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
    const mx::array& x = ins[0];
    Shapes s;
    s.L = cfg.num_layers;
    s.B = x.shape(0);
    s.T = x.shape(1);
    s.D = x.shape(2);
    s.P = cfg.context - 1;
    s.H = cfg.num_heads;
    s.hd = s.D / s.H;
    s.F = ins[kFixedInputs + 8].shape(1);
    const int R = s.B * s.T;  // rows through the projections
    const mx::array& positions = ins[3];
    const float* inv_freqs = ins[4].data<float>();
    const Kernels& kern = current_kernels();
    const StridedRowKernels rows = strided_rows_kernels(current_variant());
    const GeluFn gelu = gelu_kernel(current_variant());
    const size_t layer_kv = static_cast<size_t>(s.B) * s.P * s.D, batch_kv = static_cast<size_t>(s.P) * s.D;

    float* y = outs[0].data<float>();
    std::memcpy(y, x.data<float>(), sizeof(float) * R * s.D);
    std::vector<float> h(static_cast<size_t>(R) * s.D), qkv(static_cast<size_t>(R) * 3 * s.D);
    std::vector<float> att(static_cast<size_t>(R) * s.D), o(static_cast<size_t>(R) * s.D);
    std::vector<float> f(static_cast<size_t>(R) * s.F);
    const float q_scale = 1.f / std::sqrt(static_cast<float>(s.hd));
    const std::vector<float> rope_cs = rope_table(s.B, s.T, s.hd, inv_freqs, positions);

    for (int l = 0; l < s.L; ++l) {
      const mx::array* w = &ins[kFixedInputs + l * kMimiWeightsPerLayer];
      // Attention block.
      for (int r = 0; r < R; ++r)
        layer_norm(y + r * s.D, w[0].data<float>(), w[1].data<float>(), cfg.eps, s.D, h.data() + r * s.D);
      project(w[2], h.data(), R, s.D, 3 * s.D, qkv.data());
      for (int r = 0; r < R; ++r) {
        float* row = qkv.data() + static_cast<size_t>(r) * 3 * s.D;
        const float* cs = rope_cs.data() + static_cast<size_t>(r) * s.hd;
        for (int hh = 0; hh < s.H; ++hh) {
          rope(row + hh * s.hd, s.hd, cs);        // q
          rope(row + s.D + hh * s.hd, s.hd, cs);  // k
        }
        for (int i = 0; i < s.D; ++i) row[i] *= q_scale;
        // the new keys and values, for the ring (rows of [L, B, T, D] in the order of qkv's)
        const size_t fresh = (static_cast<size_t>(l) * R + r) * s.D;
        std::memcpy(outs[1].data<float>() + fresh, row + s.D, sizeof(float) * s.D);
        std::memcpy(outs[2].data<float>() + fresh, row + 2 * s.D, sizeof(float) * s.D);
      }
      // The heads over the pool: at the window's full 249 steps the attention is long enough to pay for
      // waking the pool (BENCHMARKS.md, "Third session" of the codec).
      const std::function<void(int)> attend_head = [&](int c) {
        const int b = c / s.H;
        const size_t kv = l * layer_kv + b * batch_kv;
        attend(s, c % s.H, cfg.context, row_position(positions, b), ins[1].data<float>() + kv, ins[2].data<float>() + kv,
               qkv.data() + static_cast<size_t>(b) * s.T * 3 * s.D, att.data() + static_cast<size_t>(b) * s.T * s.D,
               kern, rows);
      };
      pool().run_chunks(s.B * s.H, attend_head);
      project(w[3], att.data(), R, s.D, s.D, o.data());
      const float* ls1 = w[4].data<float>();
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < s.D; ++i) y[r * s.D + i] += ls1[i] * o[r * s.D + i];
      // MLP block.
      for (int r = 0; r < R; ++r)
        layer_norm(y + r * s.D, w[5].data<float>(), w[6].data<float>(), cfg.eps, s.D, h.data() + r * s.D);
      project(w[7], h.data(), R, s.D, s.F, f.data());
      for (int b = 0; b < s.B; ++b)  // exact (erf) GELU, as trained; row by row, as each stream alone
        gelu(f.data() + static_cast<size_t>(b) * s.T * s.F, s.T * s.F);
      project(w[8], f.data(), R, s.F, s.D, o.data());
      const float* ls2 = w[9].data<float>();
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < s.D; ++i) y[r * s.D + i] += ls2[i] * o[r * s.D + i];
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// MimiRingWrite

std::vector<mx::Shape> MimiRingWrite::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

void MimiRingWrite::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.mimi_ring_write runs on the CPU only");
}

void MimiRingWrite::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(
      stream(), inputs, out,
      [](std::vector<mx::array>& ins, mx::array& out) {
        const mx::array &ring = ins[0], &fresh = ins[1];
        const int L = ring.shape(0), B = ring.shape(1), P = ring.shape(2), D = ring.shape(3), T = fresh.shape(2);
        float* dst = out.data<float>();
        // Not donated (someone still holds the old ring, e.g. a parked stream): start from a copy of it.
        if (dst != ring.data<float>()) std::memcpy(dst, ring.data<float>(), ring.nbytes());
        for (int lb = 0; lb < L * B; ++lb) {
          const int position = row_position(ins[2], lb % B);  // batch row b's stream
          for (int t = std::max(0, T - P); t < T; ++t) {  // only the last P new steps stay
            const int slot = ((position + t) % P + P) % P;  // (a mod that a negative position cannot break)
            std::memcpy(dst + (static_cast<size_t>(lb) * P + slot) * D,
                        fresh.data<float>() + (static_cast<size_t>(lb) * T + t) * D, sizeof(float) * D);
          }
        }
      },
      /*donor=*/0);
}

// ---------------------------------------------------------------------------------------------------------
// panel_matmul

mx::array panel_matmul(const mx::array& x, const mx::array& wp, int n, const std::optional<mx::array>& bias,
                       mx::StreamOrDevice s) {
  auto bad = [](const std::string& msg) { throw std::invalid_argument("panel_matmul: " + msg); };
  if (x.dtype() != mx::float32 || x.ndim() < 1) bad("x must be float32 [..., K]");
  const int K = x.shape(-1);
  if (n < 1) bad("n must be positive");
  if (wp.dtype() != mx::float32 || wp.shape() != mx::Shape{(n + kPanel - 1) / kPanel, K, kPanel})
    bad("wp must be float32 [ceil(n / 16), K, 16] for x's K");
  if (bias && (bias->dtype() != mx::float32 || bias->shape() != mx::Shape{n})) bad("bias must be float32 [n]");
  auto st = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, wp};
  if (bias) inputs.push_back(*bias);
  mx::Shape shape = x.shape();
  shape.back() = n;
  return mx::array(shape, mx::float32, std::make_shared<PanelMatmul>(st, n), inputs);
}

mx::array panel_conv(const mx::array& x, const mx::array& wp, int n, const std::optional<mx::array>& bias,
                     int kernel, int stride, mx::StreamOrDevice s) {
  auto bad = [](const std::string& msg) { throw std::invalid_argument("panel_conv: " + msg); };
  if (x.dtype() != mx::float32 || x.ndim() != 3) bad("x must be float32 [B, L, C]");
  if (kernel < 1 || stride < 1) bad("kernel and stride must be positive");
  if (x.shape(1) < kernel || (x.shape(1) - kernel) % stride) bad("L - kernel must be a multiple of the stride");
  const int K = kernel * x.shape(2);
  if (n < 1 || wp.dtype() != mx::float32 || wp.shape() != mx::Shape{(n + kPanel - 1) / kPanel, K, kPanel})
    bad("wp must be float32 [ceil(n / 16), kernel * C, 16]");
  if (bias && (bias->dtype() != mx::float32 || bias->shape() != mx::Shape{n})) bad("bias must be float32 [n]");
  auto st = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, wp};
  if (bias) inputs.push_back(*bias);
  const mx::Shape shape = {x.shape(0), (x.shape(1) - kernel) / stride + 1, n};
  return mx::array(shape, mx::float32, std::make_shared<PanelMatmul>(st, n, kernel, stride), inputs);
}

std::vector<mx::Shape> PanelMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  if (kernel_) shape[1] = (shape[1] - kernel_) / stride_ + 1;
  shape.back() = n_;
  return {shape};
}

void PanelMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.panel_matmul runs on the CPU only");
}

void PanelMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(stream(), inputs, out,
               [n = n_, kernel = kernel_, stride = stride_](std::vector<mx::array>& ins, mx::array& out) {
    const mx::array& x = ins[0];
    PanelArgs a;
    a.N = n;
    a.wp = ins[1].data<float>();
    a.bias = ins.size() > 2 ? ins[2].data<float>() : nullptr;
    if (!kernel) {  // a plain product of every row
      a.K = x.shape(-1);
      a.ldx = static_cast<size_t>(a.K);
      a.M = static_cast<int>(x.size() / std::max(1, a.K));
      a.x = x.data<float>();
      a.out = out.data<float>();
      if (a.M > 0) panel_product(a, current_variant(), pool());
      return;
    }
    // A convolution: per batch, output t's window is the kernel * C floats from x[b, t * stride].
    const int B = x.shape(0), L = x.shape(1), C = x.shape(2);
    a.K = kernel * C;
    a.ldx = static_cast<size_t>(stride) * C;
    a.M = out.shape(1);
    for (int b = 0; b < B; ++b) {
      a.x = x.data<float>() + static_cast<size_t>(b) * L * C;
      a.out = out.data<float>() + static_cast<size_t>(b) * a.M * n;
      if (a.M > 0) panel_product(a, current_variant(), pool());
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// elu

mx::array elu(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("elu: x must be float32");
  auto st = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<Elu>(st), {x});
}

void Elu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.elu runs on the CPU only");
}

void Elu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(stream(), inputs, out, [](std::vector<mx::array>& ins, mx::array& out) {
    elu_pooled(elu_kernel(current_variant()), ins[0].data<float>(), ins[0].size(), out.data<float>(), pool());
  });
}

}  // namespace csmd
