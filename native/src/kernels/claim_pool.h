// A thread pool whose caller never waits for a thread that has not started.
//
// ThreadPool::run (driver.h) hands each thread a fixed share and waits for all of them. On a machine whose
// cores are busy with other work, a helper may not be scheduled for milliseconds, and the caller spins that
// long: measured on a shared 2-core VM, Mimi's streaming decode was about twice as slow with two threads as
// with one. Here the work is cut into chunks that the caller and the helpers claim one at a time from a
// counter; the caller does every chunk nobody else claimed and then waits only for helpers that are inside
// the job (running a chunk). A helper that wakes up late finds the job closed and goes back to sleep.
//
// Plain C++20 (std::atomic wait/notify), no MLX.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "driver.h"  // CSMD_CPU_RELAX

namespace csmd {

class ClaimPool {
 public:
  explicit ClaimPool(int threads) { start(threads); }
  ~ClaimPool() { stop(); }
  ClaimPool(const ClaimPool&) = delete;
  ClaimPool& operator=(const ClaimPool&) = delete;

  int size() const { return threads_.load(std::memory_order_relaxed); }

  // Threads including the caller; waits for running jobs to end.
  void resize(int threads) {
    std::lock_guard<std::mutex> lock(run_mu_);
    stop();
    start(threads);
  }

  // fn(c) for every c in [0, chunks), on the caller and whichever helpers get there first.
  void run(int chunks, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lock(run_mu_, std::try_to_lock);
    if (!lock.owns_lock() || size() == 1 || chunks <= 1) {  // busy (another caller), serial, or one chunk
      for (int c = 0; c < chunks; ++c) fn(c);
      return;
    }
    fn_ = &fn;
    chunks_ = chunks;
    next_.store(0, std::memory_order_relaxed);
    // Open the gate under a new id (so a helper's stale compare-exchange on an older job fails), then wake.
    gate_.store(static_cast<uint64_t>(++last_id_) << 32, std::memory_order_release);
    wake_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_.notify_all();
    for (int c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < chunks;) fn(c);
    // Every chunk is claimed. Close the gate, then wait for the helpers inside to finish theirs.
    gate_.fetch_or(kClosed, std::memory_order_acq_rel);
    while ((gate_.load(std::memory_order_acquire) & kInside) != 0) CSMD_CPU_RELAX();
  }

 private:
  static constexpr uint64_t kClosed = 1ull << 31;  // gate_: job id << 32 | closed bit | helpers inside
  static constexpr uint64_t kInside = kClosed - 1;

  void start(int threads) {
    threads_.store(std::max(1, threads), std::memory_order_relaxed);
    quit_.store(false, std::memory_order_relaxed);
    const uint32_t seen = wake_.load(std::memory_order_acquire);
    for (int i = 1; i < size(); ++i) helpers_.emplace_back([this, seen] { loop(seen); });
  }

  void stop() {
    quit_.store(true, std::memory_order_relaxed);
    wake_.fetch_add(1, std::memory_order_seq_cst);
    wake_.notify_all();
    for (auto& t : helpers_) t.join();
    helpers_.clear();
  }

  void loop(uint32_t seen) {
    for (;;) {
      seen = wait_for_change(seen);
      if (quit_.load(std::memory_order_relaxed)) return;
      if (!enter()) continue;  // late: the job is closed already
      for (int c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < chunks_;) (*fn_)(c);
      gate_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Spin ~200 us (back-to-back jobs of a decode step follow each other closely), then sleep.
  uint32_t wait_for_change(uint32_t seen) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int spins = 1;; ++spins) {
      const uint32_t now = wake_.load(std::memory_order_acquire);
      if (now != seen) return now;
      CSMD_CPU_RELAX();
      if (spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(200)) break;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(seen, std::memory_order_seq_cst);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return wake_.load(std::memory_order_acquire);
  }

  // Count this helper in if a job is open; fn_ and chunks_ are then that job's until the helper leaves, as
  // its caller does not return before.
  bool enter() {
    uint64_t g = gate_.load(std::memory_order_acquire);
    for (;;) {
      if (g & kClosed) return false;
      if (gate_.compare_exchange_weak(g, g + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
  }

  std::atomic<int> threads_{1};
  std::vector<std::thread> helpers_;
  std::mutex run_mu_;
  uint32_t last_id_ = 0;
  const std::function<void(int)>* fn_ = nullptr;
  int chunks_ = 0;
  std::atomic<int> next_{0};
  std::atomic<uint64_t> gate_{kClosed};
  std::atomic<uint32_t> wake_{0};  // bumped for every job (and to stop): what sleeping helpers wait on
  std::atomic<bool> quit_{false};
  std::atomic<int> sleepers_{0};
};

}  // namespace csmd
