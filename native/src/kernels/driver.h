// Kernel dispatch, persistent thread pool and the quantized matmul driver.
// Plain C++17 (std::thread), no MLX or Python.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "avx2.h"
#include "avx512vnni.h"
#include "common.h"
#include "gemm.h"
#include "neon.h"
#include "scalar.h"
#include "softmax.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CSMD_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CSMD_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define CSMD_CPU_RELAX() ((void)0)
#endif

namespace csmd {

enum class Variant { Scalar = 0, AVX2 = 1, NEON = 2, AVX512VNNI = 3 };
constexpr int kNumVariants = 4;

inline const char* variant_name(Variant v) {
  switch (v) {
    case Variant::AVX2: return "avx2";
    case Variant::NEON: return "neon";
    case Variant::AVX512VNNI: return "avx512vnni";
    default: return "scalar";
  }
}

struct Kernels {
  float (*dot_f)(const uint8_t*, const float*, const float*, const XPrep&);
  float (*dot_i)(const uint8_t*, const float*, const float*, const XPrep&);
  float (*dot_i16)(const uint8_t*, const float*, const float*, const XPrep&);
  // dot_i16 for groups of 64 with bf16 scales and biases read in place (4 and 8 bits); nullptr where the
  // variant has none (scalar, NEON), which then converts each row's scales and biases to fp32 for dot_i16.
  float (*dot_i16_g64_bf16)(const uint8_t*, const uint16_t*, const uint16_t*, const XPrep&);
  // int16 x for the groups of 64 (steps, group sums; permuted for 4 bits) in one SIMD pass; nullptr: the
  // scalar prep_gsum + prep_x_i16_4 / prep_x_int (same integers).
  void (*prep_i16_g64)(const float*, int, bool, int16_t*, float*, float*);
  // The int8 mode's 4-bit product with bf16 scales and biases read in place (AVX2 and VNNI; nullptr for scalar
  // and NEON, where the rows' scales and biases are converted for dot_i).
  float (*dot_i8_g64_bf16)(const uint8_t*, const uint16_t*, const uint16_t*, const XPrep&);
  // The int8 mode's x at 4 bits, groups of 64, in one SIMD pass; nullptr: prep_gsum + prep_x_int.
  void (*prep_i8_g64)(const float*, int, int8_t*, float*, float*);
  void (*dequant)(const uint8_t*, const float*, const float*, int, int, int, int, int, float*);
  GemmKernels gemm;
  float (*dot_f32)(const float*, const float*, int);
  float (*dot_bf16)(const uint16_t*, const float*, int);
  void (*cvt_bf16)(const uint16_t*, int, float*);
  void (*softmax_row)(const float*, int, int, float*);
};

inline bool cpu_has_avx2() {
#if defined(CSMD_HAVE_AVX2_KERNELS)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// AVX-512 VNNI with the 256-bit (VL) encodings, on top of AVX2+FMA.
inline bool cpu_has_avx512vnni() {
#if defined(CSMD_HAVE_AVX512VNNI_KERNELS)
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_neon() {
#if defined(CSMD_HAVE_NEON_KERNELS)
  return true;  // NEON (ASIMD) is mandatory on AArch64
#else
  return false;
#endif
}

inline bool variant_available(Variant v) {
  switch (v) {
    case Variant::Scalar: return true;
    case Variant::AVX2: return cpu_has_avx2();
    case Variant::NEON: return cpu_has_neon();
    case Variant::AVX512VNNI: return cpu_has_avx512vnni();
  }
  return false;
}

inline Variant best_variant() {
  if (cpu_has_avx512vnni()) return Variant::AVX512VNNI;
  if (cpu_has_avx2()) return Variant::AVX2;
  if (cpu_has_neon()) return Variant::NEON;
  return Variant::Scalar;
}

inline Kernels kernels_for(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:
      return {avx2::dot_f, avx2::dot_i, avx2::dot_i16, avx2::dot_i16_g64_bf16, avx2::prep_i16_g64, avx2::dot_i8_g64_bf16, avx2::prep_i8_g64, avx2::dequant, {avx2::gemm_micro, avx2::gemm_pack_w}, avx2::dot_f32,
              avx2::dot_bf16, avx2::cvt_bf16, avx2::softmax_row};
#endif
#if defined(CSMD_HAVE_AVX512VNNI_KERNELS)
    case Variant::AVX512VNNI:
      return {avx2::dot_f, avx512vnni::dot_i, avx512vnni::dot_i16, avx512vnni::dot_i16_g64_bf16, avx2::prep_i16_g64, avx512vnni::dot_i8_g64_bf16, avx2::prep_i8_g64, avx2::dequant, {avx2::gemm_micro, avx2::gemm_pack_w},
              avx2::dot_f32, avx2::dot_bf16, avx2::cvt_bf16, avx2::softmax_row};
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON:
      return {neon::dot_f, neon::dot_i, neon::dot_i16, nullptr, nullptr, nullptr, nullptr, neon::dequant, {neon::gemm_micro, neon::gemm_pack_w}, neon::dot_f32,
              neon::dot_bf16, neon::cvt_bf16, neon::softmax_row};
#endif
    default:
      return {scalar::dot_f, scalar::dot_i, scalar::dot_i16, nullptr, nullptr, nullptr, nullptr, scalar::dequant, {scalar::gemm_micro, scalar::gemm_pack_w}, scalar::dot_f32,
              scalar::dot_bf16, scalar::cvt_bf16, scalar::softmax_row};
  }
}

// ---------------------------------------------------------------------------
// Scale / bias dtypes (converted per weight row, never for the whole matrix).

enum class SBType { F32 = 0, F16 = 1, BF16 = 2 };

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t man = h & 0x3FF;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      u = sign | ((127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000 | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void load_row(const void* base, SBType t, size_t offset, int n, float* out) {
  switch (t) {
    case SBType::F32: std::memcpy(out, static_cast<const float*>(base) + offset, 4 * n); break;
    case SBType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      break;
    }
    case SBType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      break;
    }
  }
}

// ---------------------------------------------------------------------------
// Persistent thread pool with two kinds of job:
//   run(fn):           fn(i, n) for i in [0, n), the caller doing i = 0; every worker takes its part.
//   run_chunks(c, fn): fn(k) for k in [0, c). Thread i first claims, one at a time, the chunks of its own
//                      contiguous share (the memory streams of a fixed split), then those left in the others'
//                      shares. A worker the OS has descheduled (another process on its core: the codec, the
//                      audio callbacks) then holds back one chunk at most, not a fixed share of the job; a
//                      worker that has not woken up yet when the chunks run out is not waited for at all.
// Idle workers spin briefly (low wake latency for the back-to-back matvecs of a decode step) and then sleep
// on a condvar. An exception thrown in any part or chunk (a std::bad_alloc, say) reaches the caller: the job's
// other threads finish or skip their work, and run/run_chunks rethrow the first exception, so a failed product
// is an error rather than an output with rows never written.

class ThreadPool {
 public:
  explicit ThreadPool(int n) { start(n); }
  ~ThreadPool() { stop(); }

  int size() const { return n_; }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    stop();
    start(n);
  }

  void run(const std::function<void(int, int)>& fn) {
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (!run_lock.owns_lock() || n_ == 1) {  // busy (another caller) or serial
      fn(0, 1);
      return;
    }
    job_ = &fn;
    pending_.store(n_ - 1, std::memory_order_relaxed);
    publish(false);
    try {
      fn(0, n_);
    } catch (...) {
      record_error(std::current_exception());
    }
    wait_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
    job_ = nullptr;
    rethrow_error();
  }

  void run_chunks(int count, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (!run_lock.owns_lock() || n_ == 1 || count <= 1) {
      for (int k = 0; k < count; ++k) fn(k);
      return;
    }
    chunk_fn_ = &fn;
    // Thread i starts on the i-th contiguous share of the chunks (the memory streams of a static split),
    // then helps with the others' shares.
    for (int i = 0; i < n_; ++i) {
      shares_[i].next.store(static_cast<int>(static_cast<long long>(count) * i / n_), std::memory_order_relaxed);
      shares_[i].end = static_cast<int>(static_cast<long long>(count) * (i + 1) / n_);
    }
    const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
    entry_.store((g & 0xFFFFFFFFu) << 32, std::memory_order_release);  // open, nobody inside
    publish(true);
    take_chunks_or_stop(0);
    // Close the door (no worker enters after this), then wait for those inside to finish their chunk.
    entry_.fetch_or(kClosed, std::memory_order_acq_rel);
    wait_until([&] { return (entry_.load(std::memory_order_acquire) & kInsideMask) == 0; });
    chunk_fn_ = nullptr;
    rethrow_error();
  }

 private:
  static constexpr uint64_t kClosed = uint64_t{1} << 31;
  static constexpr uint64_t kInsideMask = kClosed - 1;

  // The caller's wait for the job's other threads: spin first (a part or chunk takes microseconds), then
  // yield the core, since with as many threads as cores a worker the OS preempted may be waiting for this
  // very core (spinning there would hold it off until the caller's time slice ends).
  template <class Done>
  static void wait_until(Done done) {
    for (int spins = 0; !done(); ++spins) {
      if (spins < 2000)
        CSMD_CPU_RELAX();
      else
        std::this_thread::yield();
    }
  }

  // The job's first exception, from whichever thread threw it; the caller rethrows it once the job is over.
  void record_error(std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(error_mu_);
    if (!error_) error_ = std::move(e);
  }

  void rethrow_error() {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lk(error_mu_);
      e = std::exchange(error_, nullptr);
    }
    if (e) std::rethrow_exception(e);
  }

  // take_chunks, except that an exception is recorded and every share emptied, so that the other threads
  // stop after their current chunk instead of computing rows of a result that will not be used.
  void take_chunks_or_stop(int self) {
    try {
      take_chunks(self);
    } catch (...) {
      record_error(std::current_exception());
      for (int i = 0; i < n_; ++i) shares_[i].next.store(shares_[i].end, std::memory_order_relaxed);
    }
  }

  // Make the job set up by the caller visible: its kind under the next generation, then the generation.
  void publish(bool chunked) {
    const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
    job_kind_.store((g << 1) | (chunked ? 1 : 0), std::memory_order_release);
    // Spinning workers see the new generation without any lock; the mutex and
    // the notify are only paid when a worker went to sleep (seq_cst on gen_
    // and sleepers_: a worker either sees the new gen_ under mu_ before it
    // waits, or is counted in sleepers_ here).
    gen_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
  }

  void take_chunks(int self) {
    for (int j = 0; j < n_; ++j) {
      Share& share = shares_[(self + j) % n_];
      for (;;) {
        const int k = share.next.fetch_add(1, std::memory_order_relaxed);
        if (k >= share.end) break;
        (*chunk_fn_)(k);
      }
    }
  }

  // A worker joins chunked job `g` only while its door is open and still that job's.
  void join_chunks(uint64_t g, int self) {
    uint64_t st = entry_.load(std::memory_order_acquire);
    while ((st >> 32) == (g & 0xFFFFFFFFu) && !(st & kClosed)) {
      if (entry_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) {
        take_chunks_or_stop(self);  // an exception never escapes a worker: the caller rethrows it
        entry_.fetch_sub(1, std::memory_order_acq_rel);
        return;
      }
    }
  }

  void start(int n) {
    n_ = std::max(1, n);
    quit_ = false;
    shares_ = std::vector<Share>(n_);
    // Workers start from the current generation (read here, not in the new
    // thread: a job issued before the thread runs must not be missed).
    const uint64_t g0 = gen_.load(std::memory_order_acquire);
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i, g0] { loop(i, g0); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  void loop(int idx, uint64_t seen) {
    for (;;) {
      // spin up to ~50 us (the next job of a decode step follows within microseconds), then sleep: a
      // longer spin only takes the core from other work when the machine is busy
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        CSMD_CPU_RELAX();
        if (++spins % 256 == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (quit_) return;
      const uint64_t kind = job_kind_.load(std::memory_order_acquire);
      // A chunked job can be over, and the next job published, before a slow worker wakes: then the kind
      // belongs to a newer generation, which the next turn of the loop picks up. (A plain job is never
      // superseded before every worker has run its part.)
      if ((kind >> 1) != seen) continue;
      if (kind & 1) {
        join_chunks(seen, idx);
        continue;
      }
      try {
        (*job_)(idx, n_);
      } catch (...) {
        record_error(std::current_exception());  // an exception never escapes a worker: the caller rethrows it
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  int n_ = 1;
  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_, error_mu_;
  std::exception_ptr error_;  // the running job's first exception (guarded by error_mu_)
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<uint64_t> job_kind_{0};  // (generation << 1) | chunked
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  // chunked jobs
  const std::function<void(int)>* chunk_fn_ = nullptr;
  struct alignas(64) Share {  // a cache line each: a thread's own counter is not contended
    std::atomic<int> next{0};
    int end = 0;
  };
  std::vector<Share> shares_;
  std::atomic<uint64_t> entry_{0};  // (generation & 0xFFFFFFFF) << 32 | closed bit | threads inside
  bool quit_ = false;
};

inline void split_range(int n, int parts, int i, int& a, int& b) {
  a = static_cast<int>(static_cast<long long>(n) * i / parts);
  b = static_cast<int>(static_cast<long long>(n) * (i + 1) / parts);
}

// fn(i, n) across the pool when the job reads enough weight bytes to pay for waking it, else fn(0, 1) here.
inline void run_split(ThreadPool* pool, const std::function<void(int, int)>& fn, size_t work_bytes) {
  if (pool && pool->size() > 1 && work_bytes >= (64u << 10))
    pool->run(fn);
  else
    fn(0, 1);
}

// fn(n0, n1) over the rows [0, N) of a matrix-vector product, in chunks of up to 1 MB of weights (and at
// least 4 per thread, so that a thread that falls behind leaves little to take over) through run_chunks; in
// one call here when the job is too small to pay for waking the pool (see run_split). Measured on a 4-bit
// depth-decoder step: as fast as a fixed split on an idle machine, 0.54x its time with another process
// spinning on one of the two cores.
inline void run_rows(ThreadPool* pool, int N, size_t bytes_per_row, const std::function<void(int, int)>& fn) {
  const size_t total = bytes_per_row * static_cast<size_t>(N);
  if (!pool || pool->size() == 1 || total < (64u << 10) || N < 2) {
    fn(0, N);
    return;
  }
  int rows = static_cast<int>(std::max<size_t>(1, (1u << 20) / std::max<size_t>(1, bytes_per_row)));
  rows = std::max(1, std::min(rows, N / (4 * pool->size())));
  const int count = (N + rows - 1) / rows;
  const std::function<void(int)> chunk = [&](int k) { fn(k * rows, std::min(N, (k + 1) * rows)); };
  pool->run_chunks(count, chunk);
}

// ---------------------------------------------------------------------------
// Quantized matmul: out[m, n] = sum_k x[m, k] * (s[n, k/G] * q[n, k] + b[n, k/G])
//   x: [M, K] float32 (natural order), w: [N, K*bits/8] bytes,
//   scales/biases: [N, K/G] of type sbt, out: [M, N] float32.
// mode selects the single-row (M == 1) path:
//   Exact: float unpacking, fp32 accumulation (dot_f);
//   Int16: x quantized per group to int16 (dx = max|x_g|/32767), integer dot
//          products summed per group in int32 (dot_i16; ~1e-5 relative);
//   Int8:  x quantized per group to int8 for 4 bits (dx = max|x_g|/127, about
//          0.5% relative per product), int16 for 8 bits (dot_i).
// For 8-bit weights Int16 and Int8 are the same (int16 x).  M > 1 always uses
// the fp32 GEMM (gemm.h) on weights dequantized block by block (qgemm).
enum class MatvecMode { Exact = 0, Int8 = 1, Int16 = 2 };

struct QMatmulArgs {
  const float* x = nullptr;
  int M = 0, K = 0, N = 0, G = 64, bits = 4;
  const uint8_t* w = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  SBType sbt = SBType::F32;
  float* out = nullptr;
};

// x of a matrix-vector product prepared once (for one or several matrices of
// the same K, G and bits) and the row kernel of the chosen mode.
struct MatvecPrep {
  std::vector<float> xf, gsum, gdx, gcorr;
  std::vector<int8_t> xq, tmp;
  std::vector<int16_t> xq16, tmp16;
  XPrep p;
  float (*dot)(const uint8_t*, const float*, const float*, const XPrep&) = nullptr;
  float (*dot_bf16_sb)(const uint8_t*, const uint16_t*, const uint16_t*, const XPrep&) = nullptr;
  float (*dot_f32)(const float*, const float*, int) = nullptr;

  MatvecPrep(const float* x, int K, int G, int bits, const Kernels& kern, MatvecMode mode)
      : gsum(K / G), gdx(K / G), dot_f32(kern.dot_f32) {
    // The groups of 64 that have their own SIMD prep and bf16-scale kernels: int16 x (the Int16 mode, and
    // both integer modes at 8 bits), and int8 x at 4 bits.
    const bool int16_g64 = mode != MatvecMode::Exact && (bits == 8 || mode == MatvecMode::Int16) && G == 64;
    const bool int8_g64 = mode == MatvecMode::Int8 && bits == 4 && G == 64;
    if (int16_g64 && kern.prep_i16_g64) {
      xq16.resize(K);
      kern.prep_i16_g64(x, K, bits == 4, xq16.data(), gdx.data(), gsum.data());
      p.xq16 = xq16.data();
      simd_prepared(K, G, bits);
      centre(K, G, bits, xq16.data());  // permuted within each group of 64: the groups are intact
    } else if (int8_g64 && kern.prep_i8_g64) {
      xq.resize(K);
      kern.prep_i8_g64(x, K, xq.data(), gdx.data(), gsum.data());
      p.xq = xq.data();
      simd_prepared(K, G, bits);
      centre(K, G, bits, xq.data());
    } else if (mode == MatvecMode::Int16 && bits == 4) {
      xq16.resize(K);
      tmp16.resize(K);
      prep_gsum(x, K, G, bits, gsum.data(), p);
      prep_x_i16_4(x, K, G, xq16.data(), tmp16.data(), gdx.data(), p);
      centre(K, G, bits, tmp16.data());  // natural order (xq16 is permuted across groups when G = 32)
    } else {
      xf.resize(K);
      prep_x_float(x, K, G, bits, xf.data(), gsum.data(), p);
      if (mode != MatvecMode::Exact) {
        tmp.resize(K);
        if (bits == 4) xq.resize(K); else xq16.resize(K);
        prep_x_int(x, K, G, bits, xq.data(), xq16.data(), tmp.data(), gdx.data(), p);
        if (bits == 4)
          centre(K, G, bits, tmp.data());  // natural order, as above
        else
          centre(K, G, bits, xq16.data());  // natural order at 8 bits
      }
    }
    dot = mode == MatvecMode::Exact ? kern.dot_f
          : (mode == MatvecMode::Int16 ? kern.dot_i16 : kern.dot_i);
    if (int16_g64)
      dot_bf16_sb = kern.dot_i16_g64_bf16;
    else if (int8_g64)
      dot_bf16_sb = kern.dot_i8_g64_bf16;
  }

  // Centring. The kernels multiply x's integers by the weights' unsigned levels q (0..15 or 0..255), so x's
  // rounding error e meets sum_k s q_k e_k, and q's mean (about the mid level c) makes that error several
  // times larger than the one of the weights' signed part s (q - c): the weight w = s q + b is the same as
  // s (q - c) + (b + c s). So a row adds sum_g s_g * c * (gsum_g - gdx_g * sum of the group's integers),
  // which moves the c s part onto the exact float sums. Same products, a cheap per-group term: the int8
  // mode's error drops 3.5-5x, the int16 mode's a little (BENCHMARKS.md). q: x's integers in an order that
  // keeps each group's G values together.
  template <class Q>
  void centre(int K, int G, int bits, const Q* q) {
    const int ng = K / G;
    gcorr.resize(ng);
    const double c = bits == 4 ? 7.5 : 127.5;
    for (int g = 0; g < ng; ++g) {
      long long sum = 0;
      for (int i = 0; i < G; ++i) sum += q[g * G + i];
      gcorr[g] = static_cast<float>(c * (static_cast<double>(gsum[g]) - static_cast<double>(gdx[g]) * sum));
    }
    p.gcorr = gcorr.data();
  }

  // The rest of p after a SIMD prep filled gdx and gsum.
  void simd_prepared(int K, int G, int bits) {
    p.K = K;
    p.G = G;
    p.bits = bits;
    p.gdx = gdx.data();
    p.gsum = gsum.data();
  }

  // a.out[n] for n in [n0, n1) (a.x is ignored: the prepared x is used).
  void rows(const QMatmulArgs& a, int n0, int n1) const {
    const int ng = p.K / p.G;
    const size_t row_bytes = static_cast<size_t>(p.K) * p.bits / 8;
    if (a.sbt == SBType::BF16 && dot_bf16_sb) {
      const auto* s16 = static_cast<const uint16_t*>(a.scales);
      const auto* b16 = static_cast<const uint16_t*>(a.biases);
      for (int n = n0; n < n1; ++n)
        a.out[n] = dot_bf16_sb(a.w + n * row_bytes, s16 + static_cast<size_t>(n) * ng, b16 + static_cast<size_t>(n) * ng, p);
      return;
    }
    float s[8192 / 32], b[8192 / 32];  // up to K = 8192 at G = 32 on the stack
    std::vector<float> sv, bv;
    float* sp = s;
    float* bp = b;
    if (ng > 8192 / 32) {
      sv.resize(ng);
      bv.resize(ng);
      sp = sv.data();
      bp = bv.data();
    }
    for (int n = n0; n < n1; ++n) {
      load_row(a.scales, a.sbt, static_cast<size_t>(n) * ng, ng, sp);
      load_row(a.biases, a.sbt, static_cast<size_t>(n) * ng, ng, bp);
      a.out[n] = dot(a.w + n * row_bytes, sp, bp, p) + (p.gcorr ? dot_f32(sp, p.gcorr, ng) : 0.f);
    }
  }
};

// ---------------------------------------------------------------------------
// Many-row products (M > 1): the blocked fp32 GEMM of gemm.h.

// x packed for gemm_part (gemm_pack_x), the panels split over the pool.
inline void gemm_packed_x(const float* x, int M, int K, bool permute, ThreadPool* pool, std::vector<float>& xp) {
  xp.resize(gemm_packed_x_size(M, K));
  const int panels = gemm_padded_rows(M) / kGemmMR;
  std::function<void(int, int)> fn = [&](int i, int nt) {
    int p0, p1;
    split_range(panels, nt, i, p0, p1);
    gemm_pack_x(x, M, K, permute, p0, p1, xp.data());
  };
  run_split(pool, fn, xp.size() * sizeof(float));
}

// gemm_part's weight rows of an affine-quantized matrix, dequantized to fp32 (4 bits: in the permuted order
// of common.h, which gemm_pack_x gives x too).  One per thread: it holds the scales and biases of a chunk.
struct QuantFill {
  const QMatmulArgs& a;
  const Kernels& kern;
  std::vector<float> s, b;
  int n0 = 0, nrows = 0;

  QuantFill(const QMatmulArgs& args, const Kernels& k)
      : a(args), kern(k), s(static_cast<size_t>(kGemmNC) * (args.K / args.G)), b(s.size()) {}

  void rows(int first, int count) {
    const int ng = a.K / a.G;
    n0 = first;
    nrows = count;
    for (int r = 0; r < count; ++r) {
      load_row(a.scales, a.sbt, static_cast<size_t>(n0 + r) * ng, ng, s.data() + r * ng);
      load_row(a.biases, a.sbt, static_cast<size_t>(n0 + r) * ng, ng, b.data() + r * ng);
    }
  }

  void operator()(int k0, int kc, float* dst, int ldd) const {
    const int ng = a.K / a.G;
    const size_t row_bytes = static_cast<size_t>(a.K) * a.bits / 8;
    for (int r = 0; r < nrows; ++r)
      kern.dequant(a.w + (n0 + r) * row_bytes, s.data() + r * ng, b.data() + r * ng, a.K, a.G, a.bits, k0, kc,
                   dst + static_cast<size_t>(r) * ldd);
  }
};

// part(k, count) for the parts of a GEMM over N: a few per thread (each at least one weight block), handed
// out by run_chunks so that a thread that falls behind does not hold up the product; one part here when the
// job is too small to pay for waking the pool.
inline void run_gemm_parts(ThreadPool* pool, int N, size_t work_bytes, const std::function<void(int, int)>& part) {
  if (!pool || pool->size() == 1 || work_bytes < (64u << 10)) {
    part(0, 1);
    return;
  }
  const int blocks = (N + kGemmNC - 1) / kGemmNC;
  const int count = std::max(1, std::min(blocks, 4 * pool->size()));
  const std::function<void(int)> chunk = [&](int k) { part(k, count); };
  pool->run_chunks(count, chunk);
}

inline void qgemm(const QMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  std::vector<float> xp;
  gemm_packed_x(a.x, a.M, a.K, a.bits == 4, pool, xp);
  const GemmArgs g{a.M, a.N, a.K, xp.data(), a.out, kern.gemm};
  run_gemm_parts(pool, a.N, static_cast<size_t>(a.K) * a.bits / 8 * a.N * a.M, [&](int part, int parts) {
    QuantFill fill(a, kern);
    gemm_part(g, fill, part, parts);
  });
}

// Up to this many rows a quantized product runs the single-row kernels on each row (qmatvec_rows) rather than
// the GEMM on dequantized weights, which dequantizes and packs every weight however few the rows. Measured
// on 4-bit 2048x8192, ms per row (BENCHMARKS.md, "Native kernels"): the int8 kernels 0.16-0.26 at any count up
// to 128 and int16 0.21-0.26, against the GEMM's 1.7-3.2 at 2 rows, 0.32 at 16 and 0.21-0.23 at 64; the
// exact (float) kernels 0.6-0.8, which only beat the GEMM at 2-3 rows. The integer modes thus reach short
// prefills (a user's turn) with the activations' rounding they already have in every generated frame.
constexpr int kMatvecRows = 64, kMatvecRowsExact = 3;

// The single-row kernels of `mode` for each of the M rows of x, a block of weight rows at a time: the block
// comes from memory once, for the first row, and from cache for the others.
inline void qmatvec_rows(const QMatmulArgs& a, const Kernels& kern, MatvecMode mode, ThreadPool* pool) {
  const int K = a.K, N = a.N, M = a.M;
  std::vector<std::unique_ptr<MatvecPrep>> preps;
  std::vector<QMatmulArgs> rows(M, a);
  for (int m = 0; m < M; ++m) {
    preps.push_back(std::make_unique<MatvecPrep>(a.x + static_cast<size_t>(m) * K, K, a.G, a.bits, kern, mode));
    rows[m].out = a.out + static_cast<size_t>(m) * N;
  }
  constexpr int kBlock = 16;  // weight rows: 16 KB at K = 2048 and 4 bits, in L1
  const size_t row_bytes = static_cast<size_t>(K) * a.bits / 8;
  run_rows(pool, N, row_bytes, [&](int n0, int n1) {
    for (int b0 = n0; b0 < n1; b0 += kBlock)
      for (int m = 0; m < M; ++m) preps[m]->rows(rows[m], b0, std::min(n1, b0 + kBlock));
  });
}

inline void qmatmul(const QMatmulArgs& a, const Kernels& kern, MatvecMode mode, ThreadPool* pool) {
  const int K = a.K, N = a.N, M = a.M, G = a.G, bits = a.bits;
  const size_t row_bytes = static_cast<size_t>(K) * bits / 8;

  if (M == 1) {
    MatvecPrep mp(a.x, K, G, bits, kern, mode);
    run_rows(pool, N, row_bytes, [&](int n0, int n1) { mp.rows(a, n0, n1); });
    return;
  }
  if (M <= (mode == MatvecMode::Exact ? kMatvecRowsExact : kMatvecRows)) {
    qmatvec_rows(a, kern, mode, pool);
    return;
  }

  qgemm(a, kern, pool);
}

// Several single-row products of one x (count matrices of the same K, G and
// bits; x prepared once) as one pool job.  paired == false: the rows of all
// outputs are split over the threads together.  paired == true: all N are
// equal; each thread computes rows [n0, n1) of every output and then calls
// post(n0, n1) (if given) on them, e.g. an elementwise op joining the outputs.
inline void qmatvec_multi(const QMatmulArgs* a, int count, const Kernels& kern, MatvecMode mode,
                          ThreadPool* pool, bool paired = false,
                          const std::function<void(int, int)>* post = nullptr) {
  const int K = a[0].K;
  MatvecPrep mp(a[0].x, K, a[0].G, a[0].bits, kern, mode);
  const size_t row_bytes = static_cast<size_t>(K) * a[0].bits / 8;
  if (paired) {  // all N equal: each chunk is rows [n0, n1) of every output, then post
    run_rows(pool, a[0].N, row_bytes * count, [&](int n0, int n1) {
      for (int c = 0; c < count; ++c) mp.rows(a[c], n0, n1);
      if (post && n1 > n0) (*post)(n0, n1);
    });
    return;
  }
  int rows = 0;
  for (int c = 0; c < count; ++c) rows += a[c].N;
  // the outputs' rows one after another, chunked together
  run_rows(pool, rows, row_bytes, [&](int r0, int r1) {
    int base = 0;
    for (int c = 0; c < count; ++c) {
      const int lo = std::max(r0, base), hi = std::min(r1, base + a[c].N);
      if (lo < hi) mp.rows(a[c], lo - base, hi - base);
      base += a[c].N;
    }
  });
}

// ---------------------------------------------------------------------------
// Float weights: out[m, n] = sum_k x[m, k] * w[n, k] with w bfloat16 or float32
// [N, K] (Linear layout), fp32 arithmetic, any K.
//   M == 1: rows split over the threads, each row one pass over its weights
//           (dot_bf16 / dot_f32: every weight byte read once);
//   M > 1:  the blocked fp32 GEMM of gemm.h on weight blocks converted to fp32
//           (fgemm).
struct FMatmulArgs {
  const float* x = nullptr;  // [M, K]
  int M = 0, K = 0, N = 0;
  const void* w = nullptr;   // [N, K] uint16 (bfloat16 bits) or float
  bool bf16 = true;
  float* out = nullptr;      // [M, N]
};

inline size_t fweight_bytes(const FMatmulArgs& a) {
  return static_cast<size_t>(a.N) * a.K * (a.bf16 ? 2 : 4);
}

// a.out[n] = w[n] . a.x for n in [n0, n1).
inline void fmatvec_rows(const FMatmulArgs& a, const Kernels& kern, int n0, int n1) {
  const size_t K = static_cast<size_t>(a.K);
  if (a.bf16) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w);
    for (int n = n0; n < n1; ++n) a.out[n] = kern.dot_bf16(w + n * K, a.x, a.K);
  } else {
    const float* w = static_cast<const float*>(a.w);
    for (int n = n0; n < n1; ++n) a.out[n] = kern.dot_f32(w + n * K, a.x, a.K);
  }
}

// gemm_part's weight rows of a bfloat16 or float32 matrix, as fp32.
struct FloatFill {
  const FMatmulArgs& a;
  const Kernels& kern;
  int n0 = 0, nrows = 0;

  void rows(int first, int count) {
    n0 = first;
    nrows = count;
  }

  void operator()(int k0, int kc, float* dst, int ldd) const {
    for (int r = 0; r < nrows; ++r) {
      const size_t off = static_cast<size_t>(n0 + r) * a.K + k0;
      float* d = dst + static_cast<size_t>(r) * ldd;
      if (a.bf16)
        kern.cvt_bf16(static_cast<const uint16_t*>(a.w) + off, kc, d);
      else
        std::memcpy(d, static_cast<const float*>(a.w) + off, sizeof(float) * kc);
    }
  }
};

inline void fgemm(const FMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  std::vector<float> xp;
  gemm_packed_x(a.x, a.M, a.K, false, pool, xp);
  const GemmArgs g{a.M, a.N, a.K, xp.data(), a.out, kern.gemm};
  run_gemm_parts(pool, a.N, fweight_bytes(a) * static_cast<size_t>(a.M), [&](int part, int parts) {
    FloatFill fill{a, kern};
    gemm_part(g, fill, part, parts);
  });
}

inline void fmatmul(const FMatmulArgs& a, const Kernels& kern, ThreadPool* pool) {
  const int N = a.N, M = a.M;
  if (M == 1) {
    run_rows(pool, N, fweight_bytes(a) / N, [&](int n0, int n1) { fmatvec_rows(a, kern, n0, n1); });
    return;
  }
  fgemm(a, kern, pool);
}

// Several single-row float products (same K; each a[c].x is used) as one pool
// job; paired and post as in qmatvec_multi.
inline void fmatvec_multi(const FMatmulArgs* a, int count, const Kernels& kern, ThreadPool* pool,
                          bool paired = false, const std::function<void(int, int)>* post = nullptr) {
  if (paired) {  // all N equal: each chunk is rows [n0, n1) of every output, then post
    size_t row_bytes = 0;
    for (int c = 0; c < count; ++c) row_bytes += fweight_bytes(a[c]) / a[c].N;
    run_rows(pool, a[0].N, row_bytes, [&](int n0, int n1) {
      for (int c = 0; c < count; ++c) fmatvec_rows(a[c], kern, n0, n1);
      if (post && n1 > n0) (*post)(n0, n1);
    });
    return;
  }
  int rows = 0;
  for (int c = 0; c < count; ++c) rows += a[c].N;
  // the outputs' rows one after another, chunked together (all of one K and dtype in the model)
  run_rows(pool, rows, fweight_bytes(a[0]) / a[0].N, [&](int r0, int r1) {
    int base = 0;
    for (int c = 0; c < count; ++c) {
      const int lo = std::max(r0, base), hi = std::min(r1, base + a[c].N);
      if (lo < hi) fmatvec_rows(a[c], kern, lo - base, hi - base);
      base += a[c].N;
    }
  });
}

// ---------------------------------------------------------------------------
// Causal softmax of prefill attention scores: in/out [rows, S], row r holds query r % T of T new rows
// whose last one is key S - 1, so query i sees keys [0, S - T + i] (S >= T).  Rows split over the pool.
inline void causal_softmax_rows(const float* in, float* out, int rows, int T, int S, const Kernels& kern,
                           ThreadPool* pool) {
  std::function<void(int, int)> fn = [&](int i, int nt) {
    int r0, r1;
    split_range(rows, nt, i, r0, r1);
    for (int r = r0; r < r1; ++r) {
      const size_t off = static_cast<size_t>(r) * S;
      kern.softmax_row(in + off, S - T + r % T + 1, S, out + off);
    }
  };
  run_split(pool, fn, static_cast<size_t>(rows) * S * sizeof(float));
}

}  // namespace csmd
