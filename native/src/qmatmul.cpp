#include "qmatmul.h"

#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "dispatch.h"
#include "state.h"

namespace csmd {

// ---------------------------------------------------------------------------
// Settings

namespace {

std::atomic<int> g_variant{-1};  // -1: not yet chosen
// A MatvecMode, or kAutoMode (the default): int8 x where the variant has an int8 4-bit kernel that reads bf16
// scales in place (AVX2, AVX-512 VNNI: there it is faster than int16), int16 x elsewhere (scalar, NEON: their
// int8 kernels convert each row's scales first, which costs what int8 saves). BENCHMARKS.md has the measurements.
constexpr int kAutoMode = 3;
std::atomic<int> g_mode{kAutoMode};
enum class PrefillMode { Auto = 0, Bf16 = 1, Fp32 = 2 };
std::atomic<int> g_prefill{static_cast<int>(PrefillMode::Auto)};
std::mutex g_pool_mu;
std::unique_ptr<ThreadPool> g_pool;

int default_threads() {
  // CSMD_THREADS: a whole number from 1 to 256 (csmd checks it and reports any other value as an error
  // before the pool starts, csmd/environment.py; an unset, empty or bad one gives the default here).
  if (const char* env = std::getenv("CSMD_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (*env >= '0' && *env <= '9' && *end == '\0' && n >= 1 && n <= 256) return static_cast<int>(n);
  }
  int n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  // Physical cores: halve when SMT is active (memory-bound kernels gain
  // nothing from a second hyper-thread).
  std::ifstream smt("/sys/devices/system/cpu/smt/active");
  int active = 0;
  if (smt >> active && active == 1 && n > 1) n /= 2;
  return n;
}

// From this many rows on, a quantized product runs the bf16 GEMM when the prefill setting allows it (below, the
// single-row kernels of qmatmul, which the generated frames run too). Measured: BENCHMARKS.md, "bf16 prefill".
constexpr int kPrefillBf16Rows = 65;

Kernels g_kernels[kNumVariants] = {kernels_for(Variant::Scalar), kernels_for(Variant::AVX2),
                                   kernels_for(Variant::NEON), kernels_for(Variant::AVX512VNNI)};

}  // namespace

Variant current_variant() {
  int v = g_variant.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(best_variant());
    g_variant.store(v);
  }
  return static_cast<Variant>(v);
}

void set_variant(const std::string& name) {
  Variant v;
  if (name == "auto") {
    v = best_variant();
  } else if (name == "scalar") {
    v = Variant::Scalar;
  } else if (name == "avx2") {
    v = Variant::AVX2;
  } else if (name == "neon") {
    v = Variant::NEON;
  } else if (name == "avx512vnni") {
    v = Variant::AVX512VNNI;
  } else {
    throw std::invalid_argument("set_variant: unknown variant '" + name +
                                "' (expected 'auto', 'scalar', 'avx2', 'avx512vnni' or 'neon')");
  }
  if (!variant_available(v))
    throw std::invalid_argument(std::string("set_variant: variant '") + name +
                                "' is not supported on this CPU");
  g_variant.store(static_cast<int>(v));
}

const Kernels& current_kernels() { return g_kernels[static_cast<int>(current_variant())]; }

MatvecMode matvec_mode() {
  const int mode = g_mode.load(std::memory_order_relaxed);
  if (mode == kAutoMode) return current_kernels().dot_i8_g64_bf16 ? MatvecMode::Int8 : MatvecMode::Int16;
  return static_cast<MatvecMode>(mode);
}

const char* matvec_mode_name() {
  if (g_mode.load(std::memory_order_relaxed) == kAutoMode) return "auto";
  return effective_matvec_mode_name();
}

const char* effective_matvec_mode_name() {
  switch (matvec_mode()) {
    case MatvecMode::Exact: return "exact";
    case MatvecMode::Int8: return "int8";
    default: return "int16";
  }
}

void set_matvec_mode(const std::string& mode) {
  if (mode == "auto") {
    g_mode.store(kAutoMode);
  } else if (mode == "int16") {
    g_mode.store(static_cast<int>(MatvecMode::Int16));
  } else if (mode == "int8") {
    g_mode.store(static_cast<int>(MatvecMode::Int8));
  } else if (mode == "exact") {
    g_mode.store(static_cast<int>(MatvecMode::Exact));
  } else {
    throw std::invalid_argument("set_matvec_mode: expected 'auto', 'int16', 'int8' or 'exact', got '" + mode + "'");
  }
}

bool prefill_bf16() {
  return g_prefill.load(std::memory_order_relaxed) != static_cast<int>(PrefillMode::Fp32) &&
         static_cast<bool>(current_kernels().bf16);
}

const char* prefill_mode_name() {
  switch (static_cast<PrefillMode>(g_prefill.load(std::memory_order_relaxed))) {
    case PrefillMode::Bf16: return "bf16";
    case PrefillMode::Fp32: return "fp32";
    default: return "auto";
  }
}

const char* effective_prefill_mode_name() { return prefill_bf16() ? "bf16" : "fp32"; }

void set_prefill_mode(const std::string& mode) {
  if (mode == "auto") {
    g_prefill.store(static_cast<int>(PrefillMode::Auto));
  } else if (mode == "bf16") {
    if (!current_kernels().bf16)
      throw std::invalid_argument(std::string("set_prefill_mode: 'bf16' needs AVX-512 BF16, which the '") +
                                  variant_name(current_variant()) + "' kernels on this CPU lack");
    g_prefill.store(static_cast<int>(PrefillMode::Bf16));
  } else if (mode == "fp32") {
    g_prefill.store(static_cast<int>(PrefillMode::Fp32));
  } else {
    throw std::invalid_argument("set_prefill_mode: expected 'auto', 'bf16' or 'fp32', got '" + mode + "'");
  }
}

ThreadPool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<ThreadPool>(default_threads());
  return *g_pool;
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1 || n > 256) throw std::invalid_argument("set_num_threads: n must be in [1, 256]");
  pool().resize(n);
}

// ---------------------------------------------------------------------------
// Helpers

SBType sb_type(mx::Dtype t) {
  if (t == mx::float32) return SBType::F32;
  if (t == mx::bfloat16) return SBType::BF16;
  return SBType::F16;
}

void to_float(const mx::array& a, float* out) {
  const size_t n = a.size();
  if (a.dtype() == mx::float32) {
    std::memcpy(out, a.data<float>(), n * sizeof(float));
  } else if (a.dtype() == mx::bfloat16) {
    const auto* p = a.data<mx::bfloat16_t>();
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    const auto* p = a.data<mx::float16_t>();
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  }
}

const float* fp32_input(const mx::array& x, std::vector<float>& buf) {
  if (x.dtype() == mx::float32) return x.data<float>();
  buf.resize(x.size());
  to_float(x, buf.data());
  return buf.data();
}

float* fp32_output(mx::array& out, std::vector<float>& buf) {
  if (out.dtype() == mx::float32) return out.data<float>();
  buf.resize(out.size());
  return buf.data();
}

void store_output(mx::array& out, const std::vector<float>& buf) {
  if (out.dtype() == mx::bfloat16) {
    auto* o = out.data<mx::bfloat16_t>();
    for (size_t i = 0; i < buf.size(); ++i) o[i] = static_cast<mx::bfloat16_t>(buf[i]);
  } else if (out.dtype() == mx::float16) {
    auto* o = out.data<mx::float16_t>();
    for (size_t i = 0; i < buf.size(); ++i) o[i] = static_cast<mx::float16_t>(buf[i]);
  }
}

bool is_float_type(mx::Dtype t) {
  return t == mx::float32 || t == mx::bfloat16 || t == mx::float16;
}

std::string shape_str(const mx::array& a) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < static_cast<int>(a.ndim()); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

void check_product_x(const char* op, const mx::array& x) {
  const std::string prefix = std::string(op) + ": ";
  if (!is_float_type(x.dtype())) throw std::invalid_argument(prefix + "x must be float32, bfloat16 or float16");
  if (x.ndim() < 1) throw std::invalid_argument(prefix + "x must have at least one dimension");
}

mx::Shape product_shape(const mx::array& x, int N) {
  mx::Shape sh = x.shape();
  sh.back() = N;
  return sh;
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("quantized_matmul: " + msg); };
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  check_product_x("quantized_matmul", x);
  if (w.dtype() != mx::uint32) fail("w must be uint32 (packed MLX affine quantization)");
  if (w.ndim() != 2) fail("w must be 2-D [out, in*bits/32], got shape " + shape_str(w));
  if (!is_float_type(scales.dtype()) || scales.dtype() != biases.dtype())
    fail("scales and biases must share one dtype of float32, bfloat16 or float16");
  const int K = x.shape(-1);
  const int N = w.shape(0);
  if (static_cast<long long>(w.shape(1)) * 32 / bits != K)
    fail("x has " + std::to_string(K) + " input features but w " + shape_str(w) + " holds " +
         std::to_string(static_cast<long long>(w.shape(1)) * 32 / bits) + " at " + std::to_string(bits) +
         " bits");
  if (K % group_size != 0)
    fail("input features " + std::to_string(K) + " are not a multiple of group_size " +
         std::to_string(group_size));
  if (scales.ndim() != 2 || scales.shape(0) != N || scales.shape(1) != K / group_size)
    fail("scales must have shape (" + std::to_string(N) + ", " + std::to_string(K / group_size) +
         "), got " + shape_str(scales));
  if (biases.shape() != scales.shape())
    fail("biases must have the shape of scales " + shape_str(scales) + ", got " + shape_str(biases));
  if (N == 0 || K == 0) fail("empty weight matrix");

  return mx::array(product_shape(x, N), x.dtype(), std::make_shared<QMatmul>(mx::to_stream(s), group_size, bits),
                   {x, w, scales, biases});
}

bool QMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> QMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {product_shape(inputs[0], inputs[1].shape(0))};
}

void QMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "csmd_native.quantized_matmul runs on the CPU only; use mx.quantized_matmul on the GPU "
      "(or pass stream=mx.cpu)");
}

void QMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(stream(), inputs, out, [G = group_size_, bits = bits_](std::vector<mx::array>& ins, mx::array& out) {
    const mx::array &x = ins[0], &w = ins[1], &sc = ins[2], &bi = ins[3];
    eval_product_fp32(x, out, [&](const float* xf, int M, float* of) {
      QMatmulArgs a;
      a.x = xf;
      a.M = M;
      a.K = x.shape(-1);
      a.N = w.shape(0);
      a.G = G;
      a.bits = bits;
      a.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
      a.scales = sc.data<void>();
      a.biases = bi.data<void>();
      a.sbt = sb_type(sc.dtype());
      a.out = of;
      if (M >= kPrefillBf16Rows && prefill_bf16())
        qgemm_bf16(a, current_kernels().bf16, &pool());
      else
        qmatmul(a, current_kernels(), matvec_mode(), &pool());
    });
  });
}

}  // namespace csmd
