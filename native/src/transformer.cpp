#include "transformer.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include "dispatch.h"
#include "kernels/common.h"
#include "kernels/fmatmul_driver.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

namespace {

int per_layer(int bits) { return float_weights(bits) ? 9 : 23; }

FMatmulArgs fargs(const Proj& p, const float* x, int M, float* y) {
  FMatmulArgs a;
  a.x = x;
  a.M = M;
  a.K = p.in;
  a.N = p.out;
  a.bf16 = p.w->dtype() == mx::bfloat16;
  a.w = a.bf16 ? static_cast<const void*>(p.w->data<mx::bfloat16_t>()) : static_cast<const void*>(p.w->data<float>());
  a.out = y;
  return a;
}

QMatmulArgs qargs(const Proj& p, const float* x, int M, float* y, int group_size, int bits) {
  QMatmulArgs a;
  a.x = x;
  a.M = M;
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

// x rounded to the nearest bfloat16, as MLX rounds (astype, or a float32 written into a bfloat16 array).
void round_to_bf16(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<mx::bfloat16_t>(x[i]));
}

}  // namespace

// Never the GEMMs, whatever M: they would sum in another order than the one-row kernels (and the exact
// mode's quantized product switches to its GEMM from 4 rows on).
void project(const Proj& p, const float* x, int M, float* y, int group_size, int bits) {
  if (float_weights(bits))
    fmatvec_batch(fargs(p, x, M, y), current_kernels(), &pool());
  else
    qmatvec_rows(qargs(p, x, M, y, group_size, bits), current_kernels(), matvec_mode(), &pool());
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

// Row t of a cache's keys or values (`at` its first element) as fp32: the cache's own floats, or its bfloat16
// values widened into `scratch` [D] (exact: a bfloat16 is the upper half of a float32).
inline const float* cached_row(const StackRow& row, const void* cache, size_t at, int D, float* scratch) {
  if (!row.bf16) return static_cast<const float*>(cache) + at;
  const auto* p = static_cast<const uint16_t*>(cache) + at;
  for (int e = 0; e < D; ++e) scratch[e] = bf16_to_f32(p[e]);
  return scratch;
}

// Attention of B query rows, row b over positions 0..rows[b].position of its own cache: the cache's rows
// before the position, the new k/v (k_new, v_new [B, KVH * D]) at it. The work comes in chunks of one
// (row, kv head): the rep = NH / KVH query heads that share the kv head run together, so that each cached key
// and value is read (and, from a bf16 cache, widened) once for all of them rather than once per query head.
// Each query head still gets its own scores, fp32 softmax and weighted sum, in the order of positions, as if
// it ran alone: the grouping and the threads change nothing in the result.
void attend(const float* q, const float* k_new, const float* v_new, const StackRow* rows, int B, size_t layer,
            int NH, int KVH, int D, float* out) {
  const Kernels& kern = current_kernels();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int rep = NH / KVH;
  // sc: the group's scores, [rep][pos + 1]; scratch: one widened bf16 row.
  const auto group = [&](int b, int kvh, std::vector<float>& sc, std::vector<float>& scratch) {
    const StackRow& row = rows[b];
    const int pos = row.position, T = row.T, n = pos + 1;
    const size_t at = (layer * KVH + kvh) * static_cast<size_t>(T) * D;
    const float* qg = q + (static_cast<size_t>(b) * NH + static_cast<size_t>(kvh) * rep) * D;  // rep heads
    const float* kn = k_new + (static_cast<size_t>(b) * KVH + kvh) * D;
    const float* vn = v_new + (static_cast<size_t>(b) * KVH + kvh) * D;
    sc.resize(static_cast<size_t>(rep) * n);
    scratch.resize(D);
    for (int t = 0; t < n; ++t) {
      const float* key = t < pos ? cached_row(row, row.cache_k, at + static_cast<size_t>(t) * D, D, scratch.data()) : kn;
      for (int r = 0; r < rep; ++r) sc[static_cast<size_t>(r) * n + t] = kern.dot_f32(qg + r * D, key, D) * scale;
    }
    std::vector<float> sum(rep, 0.f);
    for (int r = 0; r < rep; ++r) {
      float* s = sc.data() + static_cast<size_t>(r) * n;
      float top = -INFINITY;
      for (int t = 0; t < n; ++t) top = std::max(top, s[t]);
      for (int t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - top);
        sum[r] += s[t];
      }
    }
    float* og = out + (static_cast<size_t>(b) * NH + static_cast<size_t>(kvh) * rep) * D;
    std::fill(og, og + static_cast<size_t>(rep) * D, 0.f);
    for (int t = 0; t < n; ++t) {
      const float* value =
          t < pos ? cached_row(row, row.cache_v, at + static_cast<size_t>(t) * D, D, scratch.data()) : vn;
      for (int r = 0; r < rep; ++r) {
        const float p = sc[static_cast<size_t>(r) * n + t] / sum[r];
        float* oh = og + r * D;
        for (int e = 0; e < D; ++e) oh[e] += p * value[e];
      }
    }
  };
  long long work = 0;
  for (int b = 0; b < B; ++b) work += static_cast<long long>(NH) * (rows[b].position + 1) * D;
  // Threads pay off only once there is real work (a long backbone context is 2048 positions x 32 heads): a
  // short depth-decoder context stays on this thread.
  if (work >= (1 << 15)) {
    pool().run_chunks(B * KVH, [&](int c) {
      std::vector<float> sc, scratch;
      group(c / KVH, c % KVH, sc, scratch);
    });
    return;
  }
  std::vector<float> sc, scratch;
  for (int b = 0; b < B; ++b)
    for (int kvh = 0; kvh < KVH; ++kvh) group(b, kvh, sc, scratch);
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

void run_stack(const std::vector<LayerWeights>& layers, const StepConfig& cfg, int B, float* h, int H,
               const StackRow* rows, int D, const float* inv, float* new_k, float* new_v) {
  const int NH = cfg.num_heads, KVH = cfg.num_kv_heads, L = static_cast<int>(layers.size());
  const int bits = cfg.bits, G = cfg.group_size;
  const size_t QD = static_cast<size_t>(NH) * D, KVD = static_cast<size_t>(KVH) * D;
  std::vector<float> n(static_cast<size_t>(B) * H), q(B * QD), k(B * KVD), v(B * KVD), att(B * QD),
      o(static_cast<size_t>(B) * H);
  std::vector<float> g, u;
  const auto residual = [&] {
    for (size_t i = 0; i < o.size(); ++i) h[i] += o[i];
  };
  const auto norm_rows = [&](const mx::array& scale) {
    for (int b = 0; b < B; ++b) rmsnorm(h + static_cast<size_t>(b) * H, scale, cfg.eps, H, n.data() + b * H);
  };
  for (int l = 0; l < L; ++l) {
    const LayerWeights& lw = layers[l];
    norm_rows(*lw.sa_norm);
    if (float_weights(bits)) {  // q, k, v share x: one pool job
      const FMatmulArgs qkv[3] = {fargs(lw.q, n.data(), B, q.data()), fargs(lw.k, n.data(), B, k.data()),
                                  fargs(lw.v, n.data(), B, v.data())};
      fmatvec_multi(qkv, 3, current_kernels(), &pool());
    } else {  // q, k, v share x: one pool job
      const QMatmulArgs qkv[3] = {qargs(lw.q, n.data(), B, q.data(), G, bits),
                                  qargs(lw.k, n.data(), B, k.data(), G, bits),
                                  qargs(lw.v, n.data(), B, v.data(), G, bits)};
      qmatvec_multi(qkv, 3, current_kernels(), matvec_mode(), &pool());
    }
    for (int b = 0; b < B; ++b) {
      const int pos = rows[b].position;
      for (int j = 0; j < NH; ++j) rope(q.data() + b * QD + j * D, D, inv, pos);
      for (int j = 0; j < KVH; ++j) rope(k.data() + b * KVD + j * D, D, inv, pos);
      // A bf16 cache will hold this position's keys and values rounded to bf16 (the caller stores the rows
      // returned here), and later steps read them so. This step rounds them before its own attention too, so
      // the position is the same to its own query as to every later one's, and the step computes what the
      // MLX path computes, which writes the new rows into the cache first and attends over what it holds.
      if (rows[b].bf16) {
        round_to_bf16(k.data() + b * KVD, KVD);
        round_to_bf16(v.data() + b * KVD, KVD);
      }
      // Keys/values of positions < pos come from the row's cache; this position's are the new rows.
      const size_t dst = (static_cast<size_t>(b) * L + l) * KVD;
      std::memcpy(new_k + dst, k.data() + b * KVD, sizeof(float) * KVD);
      std::memcpy(new_v + dst, v.data() + b * KVD, sizeof(float) * KVD);
    }
    attend(q.data(), k.data(), v.data(), rows, B, l, NH, KVH, D, att.data());
    project(lw.o, att.data(), B, o.data(), G, bits);
    residual();

    norm_rows(*lw.mlp_norm);
    const int I = lw.w1.out;
    g.resize(static_cast<size_t>(B) * I);
    u.resize(static_cast<size_t>(B) * I);
    // w1, w3 and silu(g) * u as one pool job, split by row
    float* gp = g.data();
    const float* up = u.data();
    const std::function<void(int, int)> post = [gp, up, B, I](int n0, int n1) {
      for (int b = 0; b < B; ++b)
        for (size_t i = static_cast<size_t>(b) * I + n0; i < static_cast<size_t>(b) * I + n1; ++i)
          gp[i] = silu_mul(gp[i], up[i]);
    };
    if (float_weights(bits)) {
      const FMatmulArgs gu[2] = {fargs(lw.w1, n.data(), B, g.data()), fargs(lw.w3, n.data(), B, u.data())};
      fmatvec_multi(gu, 2, current_kernels(), &pool(), true, &post);
    } else {
      const QMatmulArgs gu[2] = {qargs(lw.w1, n.data(), B, g.data(), G, bits),
                                 qargs(lw.w3, n.data(), B, u.data(), G, bits)};
      qmatvec_multi(gu, 2, current_kernels(), matvec_mode(), &pool(), true, &post);
    }
    project(lw.w2, g.data(), B, o.data(), G, bits);
    residual();
  }
}

namespace {

// The step's checks of x, the caches and the positions: returns (L, D) from the caches.
std::pair<int, int> check_rows(const mx::array& x, const std::vector<mx::array>& caches_k,
                               const std::vector<mx::array>& caches_v, const std::vector<int>& positions,
                               int num_kv_heads, bool one_row) {
  const auto fail = [one_row](const std::string& msg) {
    throw std::invalid_argument(std::string(one_row ? "transformer_step: " : "transformer_step_batch: ") + msg);
  };
  const size_t B = caches_k.size();
  const auto row = [one_row](size_t b) { return one_row ? std::string() : "row " + std::to_string(b) + ": "; };
  const auto name = [](mx::Dtype t) { return std::string(t == mx::bfloat16 ? "bfloat16" : "float32"); };
  if (one_row) {
    if (x.dtype() != mx::float32 || x.ndim() != 2 || x.shape(0) != 1) fail("x must be float32 [1, hidden]");
  } else {
    if (caches_v.size() != B || positions.size() != B)
      fail("caches_k, caches_v and positions must be lists of one length (the rows), got " + std::to_string(B) +
           ", " + std::to_string(caches_v.size()) + " and " + std::to_string(positions.size()));
    if (B < 1 || B > static_cast<size_t>(kMaxBatchRows))
      fail("the rows must number 1 to " + std::to_string(kMaxBatchRows) + ", got " + std::to_string(B));
    if (x.dtype() != mx::float32 || x.ndim() != 2 || static_cast<size_t>(x.shape(0)) != B)
      fail("x must be float32 [rows, hidden] with one row per cache, got " + shape_str(x) + " for " +
           std::to_string(B) + " rows");
  }
  const mx::array& first = caches_k[0];
  if (first.ndim() != 4)
    fail(row(0) + "cache_k must be float32 or bfloat16 [num_layers, num_kv_heads, max_len, head_dim]");
  const int L = first.shape(0), D = first.shape(3);
  for (size_t b = 0; b < B; ++b) {
    const mx::array &ck = caches_k[b], &cv = caches_v[b];
    if (ck.ndim() != 4 || (ck.dtype() != mx::float32 && ck.dtype() != mx::bfloat16) || cv.shape() != ck.shape() ||
        cv.dtype() != ck.dtype())
      fail(row(b) +
           "cache_k and cache_v must be float32 or bfloat16 [num_layers, num_kv_heads, max_len, head_dim] of one "
           "shape and dtype");
    if (ck.dtype() != first.dtype())
      fail(row(b) + "the caches of one step must share a dtype (the new rows come back in it), got " +
           name(ck.dtype()) + " after row 0's " + name(first.dtype()));
    if (ck.shape(1) != num_kv_heads) fail(row(b) + "cache dim 1 must equal num_kv_heads");
    if (ck.shape(0) != L || ck.shape(3) != D)
      fail(row(b) + "cache " + shape_str(ck) + " differs from row 0's " + shape_str(first) +
           " in num_layers or head_dim");
    if (positions[b] < 0 || positions[b] >= ck.shape(2))
      fail(row(b) + "position must be in [0, max_len), got " + std::to_string(positions[b]) + " for max_len " +
           std::to_string(ck.shape(2)));
  }
  return {L, D};
}

std::vector<mx::array> make_step(const mx::array& x, const std::vector<mx::array>& weights,
                                 const std::vector<mx::array>& caches_k, const std::vector<mx::array>& caches_v,
                                 const std::vector<int>& positions, const mx::array& inv_freqs, int num_heads,
                                 int num_kv_heads, float eps, int group_size, int bits, bool one_row,
                                 mx::StreamOrDevice s) {
  const char* who = one_row ? "transformer_step" : "transformer_step_batch";
  const auto [L, D] = check_rows(x, caches_k, caches_v, positions, num_kv_heads, one_row);
  const int H = x.shape(1), B = static_cast<int>(positions.size());
  if (inv_freqs.dtype() != mx::float32 || inv_freqs.size() != static_cast<size_t>(D / 2))
    throw std::invalid_argument(std::string(who) + ": inv_freqs must be float32 with head_dim/2 elements");
  validate_stack(weights, L, H, num_heads, num_kv_heads, D, group_size, bits, who);
  auto st = mx::to_stream(s);
  StepConfig cfg{num_heads, num_kv_heads, eps, group_size, bits, L};
  std::vector<mx::array> inputs = {x, inv_freqs};
  for (const auto* caches : {&caches_k, &caches_v})
    for (const auto& c : *caches) inputs.push_back(c);
  for (const auto& w : weights) inputs.push_back(w);
  // The caches are only read; the new rows come out and the caller writes them (an in-place slice update).
  // Handing the whole cache back instead would copy it every step: a multi-output primitive never gets to
  // reuse its input buffer, since every output holds the inputs.
  // The new rows come in the caches' dtype, ready to store (bf16 ones rounded as the step used them).
  const mx::Shape rows = one_row ? mx::Shape{L, num_kv_heads, D} : mx::Shape{B, L, num_kv_heads, D};
  const mx::Dtype kv = caches_k[0].dtype();
  return mx::array::make_arrays({x.shape(), rows, rows}, {mx::float32, kv, kv},
                                std::make_shared<TransformerStep>(st, cfg, positions, !one_row), inputs);
}

}  // namespace

std::vector<mx::array> transformer_step(const mx::array& x, const std::vector<mx::array>& weights,
                                        const mx::array& cache_k, const mx::array& cache_v,
                                        int position, const mx::array& inv_freqs, int num_heads,
                                        int num_kv_heads, float eps, int group_size, int bits,
                                        mx::StreamOrDevice s) {
  return make_step(x, weights, {cache_k}, {cache_v}, {position}, inv_freqs, num_heads, num_kv_heads, eps,
                   group_size, bits, true, s);
}

std::vector<mx::array> transformer_step_batch(const mx::array& x, const std::vector<mx::array>& weights,
                                              const std::vector<mx::array>& caches_k,
                                              const std::vector<mx::array>& caches_v,
                                              const std::vector<int>& positions, const mx::array& inv_freqs,
                                              int num_heads, int num_kv_heads, float eps, int group_size, int bits,
                                              mx::StreamOrDevice s) {
  return make_step(x, weights, caches_k, caches_v, positions, inv_freqs, num_heads, num_kv_heads, eps, group_size,
                   bits, false, s);
}

bool TransformerStep::is_equivalent(const mx::Primitive& other) const {
  const auto& p = static_cast<const TransformerStep&>(other);
  const auto& o = p.cfg_;
  return positions_ == p.positions_ && batch_shape_ == p.batch_shape_ && cfg_.num_heads == o.num_heads &&
         cfg_.num_kv_heads == o.num_kv_heads && cfg_.eps == o.eps && cfg_.group_size == o.group_size &&
         cfg_.bits == o.bits && cfg_.num_layers == o.num_layers;
}

std::vector<mx::Shape> TransformerStep::output_shapes(const std::vector<mx::array>& inputs) {
  const mx::array& cache = inputs[2];
  const int B = static_cast<int>(positions_.size());
  const mx::Shape rows = batch_shape_ ? mx::Shape{B, cache.shape(0), cache.shape(1), cache.shape(3)}
                                      : mx::Shape{cache.shape(0), cache.shape(1), cache.shape(3)};
  return {inputs[0].shape(), rows, rows};
}

void TransformerStep::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("csmd_native.transformer_step runs on the CPU only");
}

void TransformerStep::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch_cpu(stream(), inputs, outputs,
               [cfg = cfg_, positions = positions_](std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
                 const int B = static_cast<int>(positions.size());
                 const mx::array& x = ins[0];
                 const float* inv = ins[1].data<float>();
                 const int H = x.shape(1), D = ins[2].shape(3);
                 const bool bf16 = ins[2].dtype() == mx::bfloat16;  // every cache's dtype (check_rows)
                 std::vector<StackRow> rows(B);
                 for (int b = 0; b < B; ++b) {
                   const mx::array &ck = ins[2 + b], &cv = ins[2 + B + b];
                   rows[b] = StackRow{ck.data<void>(), cv.data<void>(), static_cast<int>(ck.shape(2)), positions[b], bf16};
                 }
                 float* h = outs[0].data<float>();
                 std::memcpy(h, x.data<float>(), sizeof(float) * B * H);
                 const auto layers = parse_stack(ins, 2 + 2 * B, cfg.num_layers, H, cfg.bits);
                 std::vector<float> k32, v32;  // the new rows in fp32, for bf16 outputs
                 float* new_k = fp32_output(outs[1], k32);
                 float* new_v = fp32_output(outs[2], v32);
                 run_stack(layers, cfg, B, h, H, rows.data(), D, inv, new_k, new_v);
                 store_output(outs[1], k32);  // bf16: exact, the values are rounded already
                 store_output(outs[2], v32);
               });
}

}  // namespace csmd
