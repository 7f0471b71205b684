#include "depth_frame.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "dispatch.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

namespace {

// Inputs of the primitive: x0, inv_freqs, norm, noise, then stack, heads, embeddings, projection arrays.
constexpr int kFixedInputs = 4;

// Bytes from the start of a row-major array to its row `r` (of `row_elems` elements).
size_t row_offset_bytes(const mx::array& a, size_t r, size_t row_elems) { return r * row_elems * a.itemsize(); }

const uint8_t* bytes_of(const mx::array& a) { return static_cast<const uint8_t*>(a.data<void>()); }

// logits[B, V] = h[B, H] @ W[H, V] for float32/bfloat16 W (Sesame's head layout): every thread reads the
// columns of its share of V from all H rows, once for all B rows (a row's share stays in L1 across them). Each
// logit sums over H in the same order whatever B and the threads are.
void matvec_transposed(const mx::array& W, size_t offset_elems, const float* h, int B, int H, int V,
                       float* logits) {
  const bool bf16 = W.dtype() == mx::bfloat16;
  const std::function<void(int, int)> fn = [&](int i, int nt) {
    int v0, v1;
    split_range(V, nt, i, v0, v1);
    for (int b = 0; b < B; ++b) std::fill(logits + static_cast<size_t>(b) * V + v0, logits + b * V + v1, 0.f);
    for (int r = 0; r < H; ++r) {
      const size_t base = offset_elems + static_cast<size_t>(r) * V;
      for (int b = 0; b < B; ++b) {
        const float x = h[static_cast<size_t>(b) * H + r];
        float* out = logits + static_cast<size_t>(b) * V;
        if (bf16) {
          const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data<mx::bfloat16_t>()) + base;
          for (int v = v0; v < v1; ++v) out[v] += x * bf16_to_f32(w[v]);
        } else {
          const float* w = W.data<float>() + base;
          for (int v = v0; v < v1; ++v) out[v] += x * w[v];
        }
      }
    }
  };
  run_split(&pool(), fn, static_cast<size_t>(H) * V * W.itemsize());
}

// One embedding row [E] in natural order: dequantized (bits 4/8) or converted from float.
void embedding_row(const std::vector<const mx::array*>& table, int bits, int G, size_t row, int E, float* out) {
  const mx::array& w = *table[0];
  if (float_weights(bits)) {  // a float32 or bfloat16 row, converted as scales are
    load_row(w.data<void>(), sb_type(w.dtype()), row * E, E, out);
    return;
  }
  const int ng = E / G;
  std::vector<float> s(ng), b(ng);
  load_row(table[1]->data<void>(), sb_type(table[1]->dtype()), row * ng, ng, s.data());
  load_row(table[2]->data<void>(), sb_type(table[2]->dtype()), row * ng, ng, b.data());
  const uint8_t* q = bytes_of(w) + row * static_cast<size_t>(E) * bits / 8;
  for (int e = 0; e < E; ++e) {
    // MLX packs element e of a row at bits (e % (8 / bits)) * bits of byte e * bits / 8, low bits first.
    const int v = bits == 8 ? q[e] : (q[e / 2] >> (4 * (e & 1))) & 0xF;
    out[e] = s[e / G] * static_cast<float>(v) + b[e / G];
  }
}

void check_table(const std::vector<mx::array>& arrays, int rows, int cols, int G, int bits, const char* what,
                 const std::string& who) {
  const std::string name = who + ": " + what;
  const auto fail = [&name](const std::string& msg) { throw std::invalid_argument(name + msg); };
  if (float_weights(bits)) {
    if (arrays.size() != 1) fail(": expected one float array for bits 0/16");
    const mx::array& w = arrays[0];
    if (w.dtype() != (bits == 0 ? mx::float32 : mx::bfloat16) || w.ndim() != 2 || w.shape(0) != rows ||
        w.shape(1) != cols)
      fail(std::string(": expected a ") + (bits == 0 ? "float32" : "bfloat16") + " [" + std::to_string(rows) + ", " +
           std::to_string(cols) + "] array");
    return;
  }
  if (arrays.size() != 3) fail(": expected (w, scales, biases) for bits 4/8");
  check_quantized(arrays[0], arrays[1], arrays[2], rows, cols, G, bits, name);
}

}  // namespace

int pick_code(float* logits, const float* noise, int V, const SamplingRule& rule) {
  const float neg_inf = -INFINITY;
  for (int i = std::max(rule.codebook_size, 0); i < V; ++i) logits[i] = neg_inf;
  auto argmax = [V](const float* a) { return static_cast<int>(std::max_element(a, a + V) - a); };
  if (rule.temperature == 0.f) return argmax(logits);
  for (int i = 0; i < V; ++i) logits[i] /= rule.temperature;
  std::vector<float> work;
  if (rule.top_k > 0 && rule.top_k < V) {
    // Keep everything tied with the k-th largest, as the reference does.
    work.assign(logits, logits + V);
    std::nth_element(work.begin(), work.begin() + (rule.top_k - 1), work.end(), std::greater<float>());
    const float kth = work[rule.top_k - 1];
    for (int i = 0; i < V; ++i)
      if (logits[i] < kth) logits[i] = neg_inf;
  }
  if (rule.min_p > 0.f) {
    // p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    const float floor = *std::max_element(logits, logits + V) + std::log(rule.min_p);
    for (int i = 0; i < V; ++i)
      if (logits[i] < floor) logits[i] = neg_inf;
  }
  if (rule.top_p < 1.f) {
    work.assign(logits, logits + V);
    std::sort(work.begin(), work.end(), std::greater<float>());
    const float top = work[0];
    double total = 0.0;
    for (float l : work) total += std::exp(static_cast<double>(l - top));
    // The smallest logit still needed to reach top_p; the first one always survives.
    double before = 0.0;
    float floor = work[0];
    for (float l : work) {
      if (before >= rule.top_p) break;
      floor = l;
      before += std::exp(static_cast<double>(l - top)) / total;
    }
    for (int i = 0; i < V; ++i)
      if (logits[i] < floor) logits[i] = neg_inf;
  }
  for (int i = 0; i < V; ++i) logits[i] += noise[i];
  return argmax(logits);
}

namespace {

// The checks and the primitive behind depth_frame (one_row: x0 [2, H], noise [C, V]) and depth_frame_batch.
mx::array make_frame(const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs,
                     const mx::array& norm, const std::vector<mx::array>& heads,
                     const std::vector<mx::array>& embeddings, const std::vector<mx::array>& projection,
                     const mx::array& noise, int num_heads, int num_kv_heads, float eps, int group_size, int bits,
                     const std::vector<SamplingRule>& rules, bool one_row, mx::StreamOrDevice s) {
  const auto fail = [one_row](const std::string& msg) {
    throw std::invalid_argument(std::string(one_row ? "depth_frame: " : "depth_frame_batch: ") + msg);
  };
  const int B = static_cast<int>(rules.size());
  if (one_row) {
    if (x0.dtype() != mx::float32 || x0.ndim() != 2 || x0.shape(0) != 2) fail("x0 must be float32 [2, hidden]");
  } else {
    if (B < 1 || B > kMaxBatchRows)
      fail("the rows must number 1 to " + std::to_string(kMaxBatchRows) + ", got " + std::to_string(B));
    if (x0.dtype() != mx::float32 || x0.ndim() != 3 || x0.shape(0) != B || x0.shape(1) != 2)
      fail("x0 must be float32 [rows, 2, hidden] with one row per sampling rule, got " + shape_str(x0) + " for " +
           std::to_string(B) + " rules");
  }
  const int H = x0.shape(-1);
  if (num_heads <= 0 || H % num_heads) fail("hidden size must be a multiple of num_heads");
  const int D = H / num_heads;
  if (inv_freqs.dtype() != mx::float32 || inv_freqs.size() != static_cast<size_t>(D / 2))
    fail("inv_freqs must be float32 with head_dim/2 elements");
  if (norm.ndim() != 1 || norm.shape(0) != H || !is_float_type(norm.dtype()))
    fail("norm must be a float [hidden] array");
  const int per_layer = float_weights(bits) ? 9 : 23;
  if (stack.empty() || stack.size() % per_layer) fail("stack: wrong number of weight arrays");
  const int L = static_cast<int>(stack.size()) / per_layer;
  const char* who = one_row ? "depth_frame" : "depth_frame_batch";
  validate_stack(stack, L, H, num_heads, num_kv_heads, D, group_size, bits, who);

  // heads fix C and V
  if (heads.empty() || heads[0].ndim() != 3) fail("heads: expected a 3-D head array first");
  const int C = heads[0].shape(0);
  const int V = float_weights(bits) ? heads[0].shape(2) : heads[0].shape(1);
  if (float_weights(bits)) {
    if (heads.size() != 1 || heads[0].dtype() != (bits == 0 ? mx::float32 : mx::bfloat16) || heads[0].shape(1) != H)
      fail("heads: expected one float [codebooks, hidden, vocab] array of the stack's dtype");
  } else {
    if (heads.size() != 3) fail("heads: expected (w, scales, biases)");
    // check as one [C * V, H] matrix
    const auto flat = [](const mx::array& a) { return mx::reshape(a, {a.shape(0) * a.shape(1), a.shape(2)}); };
    check_quantized(flat(heads[0]), flat(heads[1]), flat(heads[2]), C * V, H, group_size, bits,
                    std::string(who) + ": heads");
  }
  if (C < 1) fail("heads: at least one codebook");
  const int E = float_weights(bits) ? embeddings.at(0).shape(-1) : embeddings.at(0).shape(-1) * 32 / bits;
  check_table(embeddings, (C + 1) * V, E, group_size, bits, "embeddings", who);
  check_table(projection, H, E, group_size, bits, "projection", who);
  bool sampled = false;
  for (int b = 0; b < B; ++b) {
    const SamplingRule& rule = rules[b];
    const std::string row = one_row ? "" : "row " + std::to_string(b) + ": ";
    if (rule.temperature < 0.f || !std::isfinite(rule.temperature)) fail(row + "temperature must be >= 0");
    if (rule.top_k < 0 || rule.top_p <= 0.f || rule.top_p > 1.f || rule.min_p < 0.f || rule.min_p >= 1.f)
      fail(row + "bad sampling rule (top_k >= 0, 0 < top_p <= 1, 0 <= min_p < 1)");
    if (rule.codebook_size < 1 || rule.codebook_size > V) fail(row + "codebook_size must be in [1, vocab]");
    sampled = sampled || rule.temperature > 0.f;
  }
  if (sampled) {
    const mx::Shape want = one_row ? mx::Shape{C, V} : mx::Shape{B, C, V};
    const bool fits = noise.dtype() == mx::float32 && noise.shape() == want;
    if (!fits)
      fail(one_row ? "noise must be float32 [codebooks, vocab] when sampling (temperature > 0)"
                   : "noise must be float32 [rows, codebooks, vocab] when any row samples (temperature > 0)");
  }

  auto st = mx::to_stream(s);
  DepthFrameConfig cfg;
  cfg.step = StepConfig{num_heads, num_kv_heads, eps, group_size, bits, L};
  cfg.codebooks = C;
  cfg.vocab = V;
  cfg.embed_dim = E;
  cfg.rules = rules;
  cfg.batch_shape = !one_row;
  cfg.stack_arrays = static_cast<int>(stack.size());
  cfg.head_arrays = static_cast<int>(heads.size());
  cfg.embedding_arrays = static_cast<int>(embeddings.size());
  cfg.projection_arrays = static_cast<int>(projection.size());
  std::vector<mx::array> inputs = {x0, inv_freqs, norm, noise};
  for (const auto* group : {&stack, &heads, &embeddings, &projection})
    for (const auto& a : *group) inputs.push_back(a);
  const mx::Shape shape = one_row ? mx::Shape{C} : mx::Shape{B, C};
  return mx::array(shape, mx::int32, std::make_shared<DepthFrame>(st, std::move(cfg)), inputs);
}

}  // namespace

mx::array depth_frame(const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs,
                      const mx::array& norm, const std::vector<mx::array>& heads,
                      const std::vector<mx::array>& embeddings, const std::vector<mx::array>& projection,
                      const mx::array& noise, int num_heads, int num_kv_heads, float eps, int group_size, int bits,
                      const SamplingRule& rule, mx::StreamOrDevice s) {
  return make_frame(x0, stack, inv_freqs, norm, heads, embeddings, projection, noise, num_heads, num_kv_heads, eps,
                    group_size, bits, {rule}, true, s);
}

mx::array depth_frame_batch(const mx::array& x0, const std::vector<mx::array>& stack, const mx::array& inv_freqs,
                            const mx::array& norm, const std::vector<mx::array>& heads,
                            const std::vector<mx::array>& embeddings, const std::vector<mx::array>& projection,
                            const mx::array& noise, int num_heads, int num_kv_heads, float eps, int group_size,
                            int bits, const std::vector<SamplingRule>& rules, mx::StreamOrDevice s) {
  return make_frame(x0, stack, inv_freqs, norm, heads, embeddings, projection, noise, num_heads, num_kv_heads, eps,
                    group_size, bits, rules, false, s);
}

bool DepthFrame::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DepthFrame&>(other).cfg_;
  const auto& a = cfg_;
  return a.step.num_heads == o.step.num_heads && a.step.num_kv_heads == o.step.num_kv_heads &&
         a.step.eps == o.step.eps && a.step.group_size == o.step.group_size && a.step.bits == o.step.bits &&
         a.step.num_layers == o.step.num_layers && a.codebooks == o.codebooks && a.vocab == o.vocab &&
         a.embed_dim == o.embed_dim && a.rules == o.rules && a.batch_shape == o.batch_shape;
}

std::vector<mx::Shape> DepthFrame::output_shapes(const std::vector<mx::array>&) {
  const int B = static_cast<int>(cfg_.rules.size());
  return {cfg_.batch_shape ? mx::Shape{B, cfg_.codebooks} : mx::Shape{cfg_.codebooks}};
}

void DepthFrame::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.depth_frame runs on the CPU only");
}

void DepthFrame::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(stream(), inputs, out, [cfg = cfg_](std::vector<mx::array>& ins, mx::array& out) {
    const StepConfig& sc = cfg.step;
    const int B = static_cast<int>(cfg.rules.size());
    const int H = ins[0].shape(-1), L = sc.num_layers, C = cfg.codebooks, V = cfg.vocab, E = cfg.embed_dim;
    const int KVH = sc.num_kv_heads, D = H / sc.num_heads, T = C + 1, G = sc.group_size, bits = sc.bits;
    const float* x0 = ins[0].data<float>();  // [B, 2, H]
    const float* inv = ins[1].data<float>();
    const mx::array& norm = ins[2];
    bool sampled = false;
    for (const auto& rule : cfg.rules) sampled = sampled || rule.temperature > 0.f;
    const float* noise = sampled ? ins[3].data<float>() : nullptr;  // [B, C, V]
    size_t at = kFixedInputs;
    const auto layers = parse_stack(ins, at, L, H, bits);
    at += cfg.stack_arrays;
    std::vector<const mx::array*> head, table, proj_arrays;
    for (int i = 0; i < cfg.head_arrays; ++i) head.push_back(&ins[at++]);
    for (int i = 0; i < cfg.embedding_arrays; ++i) table.push_back(&ins[at++]);
    for (int i = 0; i < cfg.projection_arrays; ++i) proj_arrays.push_back(&ins[at++]);
    Proj projection;
    projection.w = proj_arrays[0];
    if (!float_weights(bits)) {
      projection.s = proj_arrays[1];
      projection.b = proj_arrays[2];
    }
    projection.in = E;
    projection.out = H;

    // Each row's own cache, fresh every frame: [B][L, KVH, T, D]. All rows are at the same position.
    const size_t cache_size = static_cast<size_t>(L) * KVH * T * D, row_kv = static_cast<size_t>(L) * KVH * D;
    std::vector<float> cache_k(B * cache_size, 0.f), cache_v(cache_k.size(), 0.f);
    std::vector<float> new_k(B * row_kv), new_v(new_k.size());
    std::vector<StackRow> rows(B);
    for (int b = 0; b < B; ++b)
      rows[b] = StackRow{cache_k.data() + b * cache_size, cache_v.data() + b * cache_size, T, 0};
    std::vector<float> h(static_cast<size_t>(B) * H), y(h.size()), x(h.size()), logits(static_cast<size_t>(B) * V),
        e(static_cast<size_t>(B) * E);
    auto step = [&](const float* xs, int position) {  // xs [B, H]
      std::memcpy(h.data(), xs, sizeof(float) * h.size());
      for (auto& row : rows) row.position = position;
      run_stack(layers, sc, B, h.data(), H, rows.data(), D, inv, new_k.data(), new_v.data());
      for (int b = 0; b < B; ++b)
        for (int l = 0; l < L; ++l)
          for (int j = 0; j < KVH; ++j) {
            const size_t dst = b * cache_size + ((static_cast<size_t>(l) * KVH + j) * T + position) * D;
            const size_t src = b * row_kv + (static_cast<size_t>(l) * KVH + j) * D;
            std::memcpy(cache_k.data() + dst, new_k.data() + src, sizeof(float) * D);
            std::memcpy(cache_v.data() + dst, new_v.data() + src, sizeof(float) * D);
          }
      for (int b = 0; b < B; ++b) rmsnorm(h.data() + b * H, norm, sc.eps, H, y.data() + b * H);
    };
    auto head_logits = [&](int k) {  // codebook k in 1..C, for every row
      if (float_weights(bits)) {
        matvec_transposed(*head[0], static_cast<size_t>(k - 1) * H * V, y.data(), B, H, V, logits.data());
        return;
      }
      QMatmulArgs a;
      a.x = y.data();
      a.M = B;
      a.K = H;
      a.N = V;
      a.G = G;
      a.bits = bits;
      const size_t rows = static_cast<size_t>(k - 1) * V;
      a.w = bytes_of(*head[0]) + rows * H * bits / 8;
      a.scales = bytes_of(*head[1]) + row_offset_bytes(*head[1], rows, H / G);
      a.biases = bytes_of(*head[2]) + row_offset_bytes(*head[2], rows, H / G);
      a.sbt = sb_type(head[1]->dtype());
      a.out = logits.data();
      // the one-row kernel per row (never qmatmul's GEMM: the same bits as a frame of one row)
      qmatvec_rows(a, current_kernels(), matvec_mode(), &pool());
    };

    int32_t* codes = out.data<int32_t>();  // [B, C]
    const auto pick = [&](int b, int k) {
      const float* row_noise = noise ? noise + (static_cast<size_t>(b) * C + (k - 1)) * V : nullptr;
      codes[b * C + k - 1] = pick_code(logits.data() + static_cast<size_t>(b) * V, row_noise, V, cfg.rules[b]);
    };
    for (int b = 0; b < B; ++b) std::memcpy(x.data() + b * H, x0 + static_cast<size_t>(b) * 2 * H, sizeof(float) * H);
    step(x.data(), 0);
    for (int b = 0; b < B; ++b)
      std::memcpy(x.data() + b * H, x0 + static_cast<size_t>(b) * 2 * H + H, sizeof(float) * H);
    step(x.data(), 1);
    for (int k = 1; k <= C; ++k) {
      head_logits(k);
      // The filters sort or partition V logits a row: rows apart on the threads when some row samples.
      if (sampled && B > 1)
        pool().run_chunks(B, [&](int b) { pick(b, k); });
      else
        for (int b = 0; b < B; ++b) pick(b, k);
      if (k == C) break;
      for (int b = 0; b < B; ++b)
        embedding_row(table, bits, G, static_cast<size_t>(k) * V + codes[b * C + k - 1], E, e.data() + b * E);
      project(projection, e.data(), B, x.data(), G, bits);
      step(x.data(), k + 1);
    }
  });
}

}  // namespace csmd
