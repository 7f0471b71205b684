// Standalone check of the Mimi kernels' SIMD variants (fewrows.h, panel_gemm.h, elu.h (ELU, GELU), strided_rows.h) against their
// scalar versions, and of the scalar versions against a float64 reference; the threaded drivers run through a
// 3-thread ThreadPool (run_chunks). Built for aarch64 it checks NEON, for x86-64 AVX2 (when the CPU has it). Exit code 0 on
// success.
//
//   aarch64-linux-gnu-g++ -O2 -static -march=armv8-a -std=c++20 -pthread
//       -I native/src native/tests/mimi_check.cpp -o mimi_check
//   qemu-aarch64-static ./mimi_check
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/strided_rows.h"
#include "kernels/thread_pool.h"
#include "kernels/elu.h"
#include "kernels/fewrows.h"
#include "kernels/panel_gemm.h"

using namespace csmd;

static int failures = 0;
static int checks = 0;

// |got - want| <= tol * scale for every element.
static void expect_close(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                         const std::vector<double>& scale, double tol) {
  ++checks;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * scale[i] + 1e-30)) {
      ++failures;
      if (failures < 30) std::printf("FAIL %s at %zu: got %g want %g\n", what, i, got[i], want[i]);
      return;
    }
  }
}

static std::vector<float> normal(std::mt19937& rng, size_t n, float sd = 1.f) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

static uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);  // truncation: the check only needs some bf16 values
}

static void check_fewrows(std::mt19937& rng, Variant v, ThreadPool& pool) {
  for (int M : {1, 2, 3, 5, 8})
    for (int K : {1, 7, 16, 37, 512, 2049})  // 2049: past kFewRowsXBytes from 2 rows on (weight rows in pairs)
      for (bool bf16 : {false, true}) {
        const int N = 67;
        auto x = normal(rng, static_cast<size_t>(M) * K);
        auto wf = normal(rng, static_cast<size_t>(N) * K);
        std::vector<uint16_t> wb(wf.size());
        for (size_t i = 0; i < wf.size(); ++i) {
          wb[i] = to_bf16(wf[i]);
          wf[i] = bf16_to_f32(wb[i]);
          if (!bf16) wf[i] += 1e-3f;  // an fp32 weight that bf16 cannot hold
        }
        std::vector<double> want(static_cast<size_t>(M) * N), scale(want.size());
        for (int m = 0; m < M; ++m)
          for (int n = 0; n < N; ++n)
            for (int k = 0; k < K; ++k) {
              const double t = static_cast<double>(x[m * K + k]) * wf[static_cast<size_t>(n) * K + k];
              want[m * N + n] += t;
              scale[m * N + n] += std::fabs(t);
            }
        for (Variant var : {Variant::Scalar, v}) {
          FewRowsArgs a;
          a.x = x.data();
          a.M = M;
          a.K = K;
          a.N = N;
          a.bf16 = bf16;
          a.w = bf16 ? static_cast<const void*>(wb.data()) : static_cast<const void*>(wf.data());
          std::vector<float> out(want.size());
          a.out = out.data();
          fewrows_matmul(a, fewrows_kernel(var), pool);
          expect_close(var == Variant::Scalar ? "fewrows scalar" : "fewrows simd", out, want, scale, 1e-5);
        }
      }
}

// A row's product is the same floats whatever the number of rows beside it (Mimi's batched decode needs it):
// the first row of x alone against it among 2..16 rows, across kFewRowsXBytes (weight rows in pairs).
static void check_fewrows_rows_independent(std::mt19937& rng, Variant v, ThreadPool& pool) {
  for (int K : {37, 512, 1024, 2049})
    for (bool bf16 : {false, true}) {
      const int N = 67;
      auto x = normal(rng, static_cast<size_t>(16) * K);
      auto wf = normal(rng, static_cast<size_t>(N) * K);
      std::vector<uint16_t> wb(wf.size());
      for (size_t i = 0; i < wf.size(); ++i) wb[i] = to_bf16(wf[i]);
      for (Variant var : {Variant::Scalar, v}) {
        std::vector<float> first;
        for (int M = 1; M <= 16; ++M) {
          FewRowsArgs a;
          a.x = x.data();
          a.M = M;
          a.K = K;
          a.N = N;
          a.bf16 = bf16;
          a.w = bf16 ? static_cast<const void*>(wb.data()) : static_cast<const void*>(wf.data());
          std::vector<float> out(static_cast<size_t>(M) * N);
          a.out = out.data();
          fewrows_matmul(a, fewrows_kernel(var), pool);
          out.resize(N);
          ++checks;
          if (M == 1) {
            first = out;
          } else if (std::memcmp(out.data(), first.data(), sizeof(float) * N) != 0) {
            ++failures;
            std::printf("FAIL fewrows %s: row 0 of %d rows differs from row 0 alone (K %d, bf16 %d)\n",
                        var == Variant::Scalar ? "scalar" : "simd", M, K, bf16);
          }
        }
      }
    }
}

static void check_panel(std::mt19937& rng, Variant v, ThreadPool& pool) {
  for (int M : {1, 5, 6, 13, 97})
    for (int K : {1, 9, 64})
      for (int N : {1, 16, 33})
        for (int stride : {1, 2}) {  // stride 2: rows overlap-read every 2 K-blocks' worth, as panel_conv does
          const size_t ldx = static_cast<size_t>(K) * stride;
          auto x = normal(rng, ldx * M + K);
          auto w = normal(rng, static_cast<size_t>(N) * K);
          auto bias = normal(rng, N);
          const int panels = (N + kPanel - 1) / kPanel;
          std::vector<float> wp(static_cast<size_t>(panels) * K * kPanel, 0.f);
          for (int n = 0; n < N; ++n)
            for (int k = 0; k < K; ++k) wp[(static_cast<size_t>(n / kPanel) * K + k) * kPanel + n % kPanel] = w[n * K + k];
          std::vector<double> want(static_cast<size_t>(M) * N), scale(want.size());
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
              want[m * N + n] = bias[n];
              scale[m * N + n] = std::fabs(bias[n]);
              for (int k = 0; k < K; ++k) {
                const double t = static_cast<double>(x[m * ldx + k]) * w[n * K + k];
                want[m * N + n] += t;
                scale[m * N + n] += std::fabs(t);
              }
            }
          for (Variant var : {Variant::Scalar, v}) {
            PanelArgs a;
            a.x = x.data();
            a.M = M;
            a.K = K;
            a.N = N;
            a.ldx = ldx;
            a.wp = wp.data();
            a.bias = bias.data();
            std::vector<float> out(want.size());
            a.out = out.data();
            panel_gemm(a, panel_kernel(var), pool);
            expect_close(var == Variant::Scalar ? "panel scalar" : "panel simd", out, want, scale, 1e-5);
          }
        }
}

static void check_elu(std::mt19937& rng, Variant v) {
  for (int n : {1, 3, 8, 13, 1000}) {
    auto x = normal(rng, n, 10.f);
    x[0] = -200.f;  // below the clamp
    std::vector<double> want(n), scale(n);
    for (int i = 0; i < n; ++i) {
      want[i] = x[i] > 0 ? x[i] : std::expm1(static_cast<double>(x[i]));
      scale[i] = std::max(1.0, std::fabs(static_cast<double>(x[i])));
    }
    for (Variant var : {Variant::Scalar, v}) {
      std::vector<float> y(n);
      elu_kernel(var)(x.data(), n, y.data());
      expect_close(var == Variant::Scalar ? "elu scalar" : "elu simd", y, want, scale, 2e-7);
    }
    std::vector<double> want_gelu(n);
    for (int i = 0; i < n; ++i) want_gelu[i] = 0.5 * x[i] * (1.0 + std::erf(x[i] / std::sqrt(2.0)));
    for (Variant var : {Variant::Scalar, v}) {
      std::vector<float> y = x;
      gelu_kernel(var)(y.data(), n);
      expect_close(var == Variant::Scalar ? "gelu scalar" : "gelu simd", y, want_gelu, scale, 1e-6);
    }
  }
}

// Rows at a stride wider than a head (as Mimi's rings: head h at offset h * len), odd counts and lengths.
static void check_strided_rows(std::mt19937& rng, Variant v) {
  for (int n : {1, 3, 4, 9, 250})
    for (int len : {5, 8, 64, 72}) {
      const size_t stride = 3 * len + 1;
      auto rows = normal(rng, n * stride);
      auto q = normal(rng, len), p = normal(rng, n), out0 = normal(rng, len);
      std::vector<double> want_dots(n), scale_dots(n), want_sum(len), scale_sum(len);
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < len; ++i) {
          want_dots[j] += static_cast<double>(q[i]) * rows[j * stride + i];
          scale_dots[j] += std::fabs(static_cast<double>(q[i]) * rows[j * stride + i]);
        }
      for (int i = 0; i < len; ++i) {
        want_sum[i] = out0[i];
        scale_sum[i] = std::fabs(out0[i]);
        for (int j = 0; j < n; ++j) {
          want_sum[i] += static_cast<double>(p[j]) * rows[j * stride + i];
          scale_sum[i] += std::fabs(static_cast<double>(p[j]) * rows[j * stride + i]);
        }
      }
      for (Variant var : {Variant::Scalar, v}) {
        const StridedRowKernels k = strided_rows_kernels(var);
        std::vector<float> dots(n), sum = out0;
        k.row_dots(q.data(), rows.data(), stride, n, len, dots.data());
        k.weighted_sum(p.data(), rows.data(), stride, n, len, sum.data());
        expect_close(var == Variant::Scalar ? "row_dots scalar" : "row_dots simd", dots, want_dots, scale_dots, 1e-6);
        expect_close(var == Variant::Scalar ? "weighted_sum scalar" : "weighted_sum simd", sum, want_sum, scale_sum,
                     1e-6);
      }
    }
}

int main() {
  std::mt19937 rng(1234);
  const Variant simd = best_variant();
  ThreadPool pool(3);
  check_fewrows(rng, simd, pool);
  check_fewrows_rows_independent(rng, simd, pool);
  check_panel(rng, simd, pool);
  check_elu(rng, simd);
  check_strided_rows(rng, simd);
  std::printf("variant %s vs scalar: %d checks, %d failures\n", variant_name(simd), checks, failures);
  return failures ? 1 : 0;
}
