#include "transformer.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include "dispatch.h"
#include "kernels/fmatmul_driver.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

namespace {

int per_layer(int bits) { return float_weights(bits) ? 9 : 23; }

// Inputs of the primitive: x, cache_k, cache_v, inv_freqs, then the weights.
constexpr int kFixedInputs = 4;

void fail(const std::string& msg) { throw std::invalid_argument("transformer_step: " + msg); }

FMatmulArgs fargs(const Proj& p, const float* x, float* y) {
  FMatmulArgs a;
  a.x = x;
  a.M = 1;
  a.K = p.in;
  a.N = p.out;
  a.bf16 = p.w->dtype() == mx::bfloat16;
  a.w = a.bf16 ? static_cast<const void*>(p.w->data<mx::bfloat16_t>()) : static_cast<const void*>(p.w->data<float>());
  a.out = y;
  return a;
}

QMatmulArgs qargs(const Proj& p, const float* x, float* y, int group_size, int bits) {
  QMatmulArgs a;
  a.x = x;
  a.M = 1;
  a.K = p.in;
  a.N = p.out;
  a.G = group_size;
  a.bits = bits;
  a.w = reinterpret_cast<const uint8_t*>(p.w->data<uint32_t>());
  a.scales = p.s->data<void>();
  a.biases = p.b->data<void>();
  a.sbt = sb_type(p.s->dtype());
  a.out = y;
  return a;
}

inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

}  // namespace

// y[out] = W x for a quantized, bfloat16 or float32 projection.
void matvec(const Proj& p, const float* x, float* y, int group_size, int bits) {
  if (float_weights(bits))
    fmatmul(fargs(p, x, y), current_kernels(), &pool());
  else
    qmatmul(qargs(p, x, y, group_size, bits), current_kernels(), matvec_mode(), &pool());
}

void rmsnorm(const float* x, const mx::array& scale, float eps, int H, float* out) {
  double ss = 0;
  for (int i = 0; i < H; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / H) + eps);
  std::vector<float> sc(H);
  to_float(scale, sc.data());
  for (int i = 0; i < H; ++i) out[i] = x[i] * r * sc[i];
}

namespace {

void rope(float* v, int D, const float* inv_freqs, int position) {
  for (int i = 0; i < D / 2; ++i) {
    const float a = static_cast<float>(position) * inv_freqs[i];
    const float c = std::cos(a), s = std::sin(a);
    const float x0 = v[2 * i], x1 = v[2 * i + 1];
    v[2 * i] = x0 * c - x1 * s;
    v[2 * i + 1] = x0 * s + x1 * c;
  }
}

// One query row over positions 0..pos: cache rows before pos, the new k/v at pos. Heads run in parallel
// (a long backbone context is 2048 positions x 32 heads), each with fp32 softmax.
void attend(const float* q, const float* k_new, const float* v_new, const float* kc, const float* vc, int NH,
            int rep, int T, int D, int pos, float* out) {
  const Kernels& kern = current_kernels();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // Heads [j0, j1): each a chunk of work for run_chunks, or all of them on this thread.
  const auto heads = [&](int j0, int j1) {
    std::vector<float> sc(pos + 1);
    for (int j = j0; j < j1; ++j) {
      const int kvh = j / rep;
      const float* kh = kc + static_cast<size_t>(kvh) * T * D;
      const float* vh = vc + static_cast<size_t>(kvh) * T * D;
      const float* qh = q + j * D;
      float top = -INFINITY;
      for (int t = 0; t <= pos; ++t) {
        const float* key = t < pos ? kh + static_cast<size_t>(t) * D : k_new + kvh * D;
        sc[t] = kern.dot_f32(qh, key, D) * scale;
        top = std::max(top, sc[t]);
      }
      float sum = 0.f;
      for (int t = 0; t <= pos; ++t) {
        sc[t] = std::exp(sc[t] - top);
        sum += sc[t];
      }
      float* oh = out + j * D;
      std::fill(oh, oh + D, 0.f);
      for (int t = 0; t <= pos; ++t) {
        const float p = sc[t] / sum;
        const float* value = t < pos ? vh + static_cast<size_t>(t) * D : v_new + kvh * D;
        for (int e = 0; e < D; ++e) oh[e] += p * value[e];
      }
    }
  };
  // Threads pay off only once there is real work: a short depth-decoder context stays on this thread.
  if (static_cast<long long>(NH) * (pos + 1) * D >= (1 << 15))
    pool().run_chunks(NH, [&](int j) { heads(j, j + 1); });
  else
    heads(0, NH);
}

}  // namespace

void validate_stack(const std::vector<mx::array>& weights, int L, int H, int num_heads, int num_kv_heads, int D,
                    int group_size, int bits, const std::string& who) {
  const auto fail = [&who](const std::string& msg) { throw std::invalid_argument(who + ": " + msg); };
  if (bits != 0 && bits != 4 && bits != 8 && bits != 16)
    fail("bits must be 0 (float32 weights), 4, 8 or 16 (bfloat16 weights)");
  if (!float_weights(bits) && group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size must be 32, 64 or 128");
  if (num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads)
    fail("num_heads must be a positive multiple of num_kv_heads");
  if (D % 2) fail("head_dim must be even");
  if (static_cast<int>(weights.size()) != L * per_layer(bits))
    fail("expected " + std::to_string(L * per_layer(bits)) + " weight arrays (" +
         std::to_string(per_layer(bits)) + " per layer for " + std::to_string(L) + " layers), got " +
         std::to_string(weights.size()));
  // shapes of every projection
  const int qd = num_heads * D, kvd = num_kv_heads * D;
  int inter = -1;
  for (int l = 0; l < L; ++l) {
    int i = l * per_layer(bits);
    auto check_norm = [&](const mx::array& a, const char* what) {
      if (a.ndim() != 1 || a.shape(0) != H) fail(std::string(what) + " must have shape [hidden]");
      if (!is_float_type(a.dtype()))
        fail(std::string(what) + " must be float32, bfloat16 or float16");
    };
    auto check_proj = [&](int out, int in, const char* what) {
      const mx::array& w = weights[i];
      std::string name = "layer " + std::to_string(l) + " " + what;
      if (float_weights(bits)) {
        if (w.dtype() != (bits == 0 ? mx::float32 : mx::bfloat16) || w.ndim() != 2)
          fail(name + (bits == 0 ? ": weight must be float32 2-D" : ": weight must be bfloat16 2-D"));
        if (out >= 0 && w.shape(0) != out) fail(name + ": wrong output dim");
        if (w.shape(1) != in) fail(name + ": wrong input dim");
        i += 1;
      } else {
        check_quantized(weights[i], weights[i + 1], weights[i + 2], out, in, group_size, bits, who + ": " + name);
        i += 3;
      }
      return w.shape(0);
    };
    check_norm(weights[i++], "sa_norm");
    check_proj(qd, H, "q_proj");
    check_proj(kvd, H, "k_proj");
    check_proj(kvd, H, "v_proj");
    check_proj(H, qd, "o_proj");
    check_norm(weights[i++], "mlp_norm");
    const int I = check_proj(inter, H, "w1");
    if (inter < 0) inter = I;
    if (I != inter) fail("w1 output dims differ between layers");
    check_proj(inter, H, "w3");
    check_proj(H, inter, "w2");
  }
}

void check_quantized(const mx::array& w, const mx::array& sc, const mx::array& bi, int out, int in, int group_size,
                     int bits, const std::string& name) {
  const auto fail = [&name](const std::string& msg) { throw std::invalid_argument(name + msg); };
  if (w.dtype() != mx::uint32 || w.ndim() != 2) fail(": packed weight must be uint32 2-D");
  if (out >= 0 && w.shape(0) != out) fail(": wrong output dim");
  if (static_cast<long long>(w.shape(1)) * 32 / bits != in) fail(": wrong input dim");
  if (in % group_size) fail(": input dim not a multiple of group_size");
  if (sc.ndim() != 2 || sc.shape(0) != w.shape(0) || sc.shape(1) != in / group_size || bi.shape() != sc.shape() ||
      sc.dtype() != bi.dtype() || !is_float_type(sc.dtype()))
    fail(": bad scales/biases");
}

std::vector<LayerWeights> parse_stack(const std::vector<mx::array>& arrays, size_t first, int L, int H, int bits) {
  size_t wi = first;
  auto next_proj = [&](int in) {
    Proj p;
    p.w = &arrays[wi];
    p.out = arrays[wi].shape(0);
    p.in = in;
    if (float_weights(bits)) {
      wi += 1;
    } else {
      p.s = &arrays[wi + 1];
      p.b = &arrays[wi + 2];
      wi += 3;
    }
    return p;
  };
  std::vector<LayerWeights> layers(L);
  for (auto& lw : layers) {
    lw.sa_norm = &arrays[wi++];
    lw.q = next_proj(H);
    lw.k = next_proj(H);
    lw.v = next_proj(H);
    lw.o = next_proj(lw.q.out);
    lw.mlp_norm = &arrays[wi++];
    lw.w1 = next_proj(H);
    lw.w3 = next_proj(H);
    lw.w2 = next_proj(lw.w1.out);
  }
  return layers;
}

void run_stack(const std::vector<LayerWeights>& layers, const StepConfig& cfg, float* h, int H, const float* cache_k,
               const float* cache_v, int T, int D, const float* inv, float* new_k, float* new_v) {
  const int NH = cfg.num_heads, KVH = cfg.num_kv_heads, pos = cfg.position, rep = NH / KVH;
  const int bits = cfg.bits, G = cfg.group_size;
  std::vector<float> n(H), q(NH * D), k(KVH * D), v(KVH * D), att(NH * D), o(H);
  std::vector<float> g, u;
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerWeights& lw = layers[l];
    rmsnorm(h, *lw.sa_norm, cfg.eps, H, n.data());
    if (float_weights(bits)) {  // q, k, v share x: one pool job
      const FMatmulArgs qkv[3] = {fargs(lw.q, n.data(), q.data()), fargs(lw.k, n.data(), k.data()),
                                  fargs(lw.v, n.data(), v.data())};
      fmatvec_multi(qkv, 3, current_kernels(), &pool());
    } else {  // q, k, v share x: one pool job
      const QMatmulArgs qkv[3] = {qargs(lw.q, n.data(), q.data(), G, bits), qargs(lw.k, n.data(), k.data(), G, bits),
                                  qargs(lw.v, n.data(), v.data(), G, bits)};
      qmatvec_multi(qkv, 3, current_kernels(), matvec_mode(), &pool());
    }
    for (int j = 0; j < NH; ++j) rope(q.data() + j * D, D, inv, pos);
    // Keys/values of positions < pos come from the cache; this position's are the new rows.
    const float* kc = cache_k + l * KVH * T * D;
    const float* vc = cache_v + l * KVH * T * D;
    for (int j = 0; j < KVH; ++j) rope(k.data() + j * D, D, inv, pos);
    std::memcpy(new_k + l * KVH * D, k.data(), sizeof(float) * KVH * D);
    std::memcpy(new_v + l * KVH * D, v.data(), sizeof(float) * KVH * D);
    attend(q.data(), k.data(), v.data(), kc, vc, NH, rep, T, D, pos, att.data());
    matvec(lw.o, att.data(), o.data(), G, bits);
    for (int i = 0; i < H; ++i) h[i] += o[i];

    rmsnorm(h, *lw.mlp_norm, cfg.eps, H, n.data());
    g.resize(lw.w1.out);
    u.resize(lw.w3.out);
    // w1, w3 and silu(g) * u as one pool job, split by row
    float* gp = g.data();
    const float* up = u.data();
    const std::function<void(int, int)> post = [gp, up](int n0, int n1) {
      for (int i = n0; i < n1; ++i) gp[i] = silu_mul(gp[i], up[i]);
    };
    if (float_weights(bits)) {
      const FMatmulArgs gu[2] = {fargs(lw.w1, n.data(), g.data()), fargs(lw.w3, n.data(), u.data())};
      fmatvec_multi(gu, 2, current_kernels(), &pool(), true, &post);
    } else {
      const QMatmulArgs gu[2] = {qargs(lw.w1, n.data(), g.data(), G, bits), qargs(lw.w3, n.data(), u.data(), G, bits)};
      qmatvec_multi(gu, 2, current_kernels(), matvec_mode(), &pool(), true, &post);
    }
    matvec(lw.w2, g.data(), o.data(), G, bits);
    for (int i = 0; i < H; ++i) h[i] += o[i];
  }
}

std::vector<mx::array> transformer_step(const mx::array& x, const std::vector<mx::array>& weights,
                                        const mx::array& cache_k, const mx::array& cache_v,
                                        int position, const mx::array& inv_freqs, int num_heads,
                                        int num_kv_heads, float eps, int group_size, int bits,
                                        mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() != 2 || x.shape(0) != 1) fail("x must be float32 [1, hidden]");
  const int H = x.shape(1);
  if (cache_k.ndim() != 4 || cache_k.dtype() != mx::float32 || cache_v.shape() != cache_k.shape() ||
      cache_v.dtype() != mx::float32)
    fail("cache_k and cache_v must be float32 [num_layers, num_kv_heads, max_len, head_dim] of one shape");
  const int L = cache_k.shape(0), T = cache_k.shape(2), D = cache_k.shape(3);
  if (cache_k.shape(1) != num_kv_heads) fail("cache dim 1 must equal num_kv_heads");
  if (position < 0 || position >= T) fail("position must be in [0, max_len)");
  if (inv_freqs.dtype() != mx::float32 || inv_freqs.size() != static_cast<size_t>(D / 2))
    fail("inv_freqs must be float32 with head_dim/2 elements");
  validate_stack(weights, L, H, num_heads, num_kv_heads, D, group_size, bits, "transformer_step");
  auto st = mx::to_stream(s);
  StepConfig cfg{position, num_heads, num_kv_heads, eps, group_size, bits, L};
  std::vector<mx::array> inputs = {x, cache_k, cache_v, inv_freqs};
  for (const auto& w : weights) inputs.push_back(w);
  // The cache is only read; the new rows come out and the caller writes them (an in-place slice update).
  // Handing the whole cache back instead would copy it every step: a multi-output primitive never gets to
  // reuse its input buffer, since every output holds the inputs.
  const mx::Shape rows = {L, num_kv_heads, D};
  return mx::array::make_arrays({x.shape(), rows, rows}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<TransformerStep>(st, cfg), inputs);
}

bool TransformerStep::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const TransformerStep&>(other).cfg_;
  return cfg_.position == o.position && cfg_.num_heads == o.num_heads &&
         cfg_.num_kv_heads == o.num_kv_heads && cfg_.eps == o.eps && cfg_.group_size == o.group_size &&
         cfg_.bits == o.bits && cfg_.num_layers == o.num_layers;
}

std::vector<mx::Shape> TransformerStep::output_shapes(const std::vector<mx::array>& inputs) {
  const mx::Shape rows = {inputs[1].shape(0), inputs[1].shape(1), inputs[1].shape(3)};
  return {inputs[0].shape(), rows, rows};
}

void TransformerStep::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("csmd_native.transformer_step runs on the CPU only");
}

void TransformerStep::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch_cpu(stream(), inputs, outputs, [cfg = cfg_](std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
    const mx::array& x = ins[0];
    const float* cache_k = ins[1].data<float>();
    const float* cache_v = ins[2].data<float>();
    float* new_k = outs[1].data<float>();
    float* new_v = outs[2].data<float>();
    const float* inv = ins[3].data<float>();
    const int H = x.shape(1), T = ins[1].shape(2), D = ins[1].shape(3);
    float* h = outs[0].data<float>();
    std::memcpy(h, x.data<float>(), sizeof(float) * H);
    const auto layers = parse_stack(ins, kFixedInputs, cfg.num_layers, H, cfg.bits);
    run_stack(layers, cfg, h, H, cache_k, cache_v, T, D, inv, new_k, new_v);
  });
}

}  // namespace csmd
