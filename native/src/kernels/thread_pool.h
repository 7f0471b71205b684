// The persistent thread pool, and the ways a product's rows are spread over it. No MLX or Python.
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

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CSMD_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CSMD_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define CSMD_CPU_RELAX() ((void)0)
#endif

namespace csmd {

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
// one call here when the job is too small to pay for waking the pool (see run_split). Against a fixed split it
// is as fast on an idle machine and much faster with another process on one of the cores (BENCHMARKS.md,
// "a thread pool that tolerates busy cores").
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

// Weight rows a product over several rows of x takes at a time (qmatvec_multi, fmatvec_multi): the block comes
// from memory once, for the first row of x, and from cache (L1) for the others.
constexpr size_t kWeightBlockBytes = 16 << 10;

inline int weight_block_rows(size_t row_bytes) {
  return static_cast<int>(std::clamp<size_t>(kWeightBlockBytes / std::max<size_t>(row_bytes, 1), 1, 64));
}

}  // namespace csmd
