// Standalone check of the SIMD kernel variants against the scalar ones.
//
// Built for aarch64 it compares the NEON variant with the scalar variant;
// built for x86-64 it compares AVX2 (when the CPU has it) with scalar.  The
// scalar variant itself is checked against a float64 reference computed from
// the packed uint32 words in natural order.  Exit code 0 on success.
//
//   aarch64-linux-gnu-g++ -O2 -static -march=armv8-a -std=c++20 -pthread
//       -I native/src native/tests/neon_check.cpp -o neon_check
//   qemu-aarch64-static ./neon_check
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "kernels/fmatmul_driver.h"
#include "kernels/qmatmul_driver.h"

using namespace csmd;

static int failures = 0;

static void check(bool ok, const char* what, int K, int N, int M, int G, int bits, double err) {
  if (!ok) {
    ++failures;
    if (failures < 30)
      std::printf("FAIL %s K=%d N=%d M=%d G=%d bits=%d err=%g\n", what, K, N, M, G, bits, err);
  }
}

struct Case {
  int K, N, G, bits;
  std::vector<uint32_t> w;
  std::vector<float> s, b;
  std::vector<uint16_t> s16, b16;  // bf16 copies
};

static Case make_case(std::mt19937& rng, int K, int N, int G, int bits) {
  Case c{K, N, G, bits, {}, {}, {}, {}, {}};
  const int per = 32 / bits;
  c.w.resize(static_cast<size_t>(N) * K / per);
  for (auto& v : c.w) v = rng();
  std::normal_distribution<float> nd(0.f, 1.f);
  c.s.resize(static_cast<size_t>(N) * K / G);
  c.b.resize(c.s.size());
  for (size_t i = 0; i < c.s.size(); ++i) {
    c.s[i] = 0.02f * nd(rng);
    c.b[i] = 0.1f * nd(rng);
    // round to bf16 so the bf16 path sees identical values
    uint32_t u;
    std::memcpy(&u, &c.s[i], 4);
    u &= 0xFFFF0000u;
    std::memcpy(&c.s[i], &u, 4);
    c.s16.push_back(static_cast<uint16_t>(u >> 16));
    std::memcpy(&u, &c.b[i], 4);
    u &= 0xFFFF0000u;
    std::memcpy(&c.b[i], &u, 4);
    c.b16.push_back(static_cast<uint16_t>(u >> 16));
  }
  return c;
}

// float64 reference from the packed words (natural order)
static double ref_dot(const Case& c, int n, const float* x) {
  const int per = 32 / c.bits, mask = (1 << c.bits) - 1, ng = c.K / c.G;
  double acc = 0;
  for (int k = 0; k < c.K; ++k) {
    const uint32_t word = c.w[(static_cast<size_t>(n) * c.K + k) / per];
    const int q = (word >> ((k % per) * c.bits)) & mask;
    const int g = k / c.G;
    acc += (static_cast<double>(c.s[n * ng + g]) * q + c.b[n * ng + g]) * x[k];
  }
  return acc;
}

int main() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  const Variant simd = best_variant();
  std::printf("arch variant under test: %s\n", variant_name(simd));
  const Kernels ks = kernels_for(Variant::Scalar);
  const Kernels kv = kernels_for(simd);
  ThreadPool pool(3);
  int cases = 0;

  const int Ks[] = {32, 64, 96, 128, 160, 192, 256, 384, 1024, 1056, 2048};
  const int Ns[] = {1, 3, 7, 16, 17, 33};
  const int Ms[] = {1, 2, 3, 4, 5, 7, 17};
  for (int bits : {4, 8})
    for (int G : {32, 64, 128})
      for (int K : Ks) {
        if (K % G) continue;
        for (int N : Ns) {
          Case c = make_case(rng, K, N, G, bits);
          const uint8_t* wb = reinterpret_cast<const uint8_t*>(c.w.data());
          const size_t rb = static_cast<size_t>(K) * bits / 8;
          const int ng = K / G;
          std::vector<float> x(K);
          for (auto& v : x) v = nd(rng);
          // x with a zero group (int8 path must handle dx = 0)
          if (K >= 2 * G) for (int i = 0; i < G; ++i) x[G + i] = 0.f;
          std::vector<float> xf(K), gsum(ng), gdx(ng);
          std::vector<int8_t> xq(K), tmp(K);
          std::vector<int16_t> xq16(K);
          XPrep p;
          prep_x_float(x.data(), K, G, bits, xf.data(), gsum.data(), p);
          prep_x_int(x.data(), K, G, bits, xq.data(), xq16.data(), tmp.data(), gdx.data(), p);
          // int16 x for 4 bits (word-permuted), its own XPrep
          std::vector<int16_t> xw(K), tmpw(K);
          std::vector<float> gdx16(ng), gsum16(ng);
          XPrep p16;
          prep_gsum(x.data(), K, G, bits, gsum16.data(), p16);
          if (bits == 4) {
            prep_x_i16_4(x.data(), K, G, xw.data(), tmpw.data(), gdx16.data(), p16);
          } else {
            p16 = p;
          }
          double xnorm = 0;
          for (float v : x) xnorm += std::fabs(v);
          for (int n = 0; n < N; ++n) {
            const float* s = c.s.data() + n * ng;
            const float* b = c.b.data() + n * ng;
            const double r = ref_dot(c, n, x.data());
            // scale of the terms: sum |w||x| bounded by (|s|*qmax + |b|) * sum|x|
            double wmax = 0;
            for (int g = 0; g < ng; ++g)
              wmax = std::fmax(wmax, std::fabs(s[g]) * ((1 << bits) - 1) + std::fabs(b[g]));
            const double scale = wmax * xnorm + 1e-6;
            const float fs = ks.dot_f(wb + n * rb, s, b, p);
            const float fv = kv.dot_f(wb + n * rb, s, b, p);
            check(std::fabs(fs - r) <= 1e-5 * scale, "scalar dot_f vs f64", K, N, 1, G, bits, fs - r);
            check(std::fabs(fv - fs) <= 1e-5 * scale, "simd dot_f vs scalar", K, N, 1, G, bits, fv - fs);
            const float is = ks.dot_i(wb + n * rb, s, b, p);
            const float iv = kv.dot_i(wb + n * rb, s, b, p);
            // int8 x: |x - xq*dx| <= dx/2 = max|x_g|/254 per element
            check(std::fabs(is - r) <= 5e-3 * scale, "scalar dot_i vs f64", K, N, 1, G, bits, is - r);
            check(std::fabs(iv - is) <= 1e-5 * scale, "simd dot_i vs scalar", K, N, 1, G, bits, iv - is);
            // int16 x: |x - xq*dx| <= dx/2 = max|x_g|/65534 per element
            const float js = ks.dot_i16(wb + n * rb, s, b, p16);
            const float jv = kv.dot_i16(wb + n * rb, s, b, p16);
            check(std::fabs(js - r) <= 1e-4 * scale, "scalar dot_i16 vs f64", K, N, 1, G, bits, js - r);
            check(std::fabs(jv - js) <= 1e-5 * scale, "simd dot_i16 vs scalar", K, N, 1, G, bits, jv - js);
            // dequant: whole row in 256-chunks, compare elementwise
            for (int k0 = 0; k0 < K; k0 += kGemmKC) {
              const int kn = std::min(kGemmKC, K - k0);
              std::vector<float> d1(kn), d2(kn);
              ks.dequant(wb + n * rb, s, b, K, G, bits, k0, kn, d1.data());
              kv.dequant(wb + n * rb, s, b, K, G, bits, k0, kn, d2.data());
              double e = 0;
              for (int i = 0; i < kn; ++i) e = std::fmax(e, std::fabs(d1[i] - d2[i]));
              check(e <= 1e-6 * wmax, "dequant simd vs scalar", K, N, 1, G, bits, e);
            }
            ++cases;
          }
          // full driver: several M, both kernel sets, float32 and bf16 scales
          for (int M : Ms) {
            std::vector<float> X(static_cast<size_t>(M) * K);
            for (auto& v : X) v = nd(rng);
            for (int sbt = 0; sbt < 2; ++sbt)
              for (int mode = 0; mode < (M == 1 ? 3 : 1); ++mode) {
                const bool int8 = mode == static_cast<int>(MatvecMode::Int8) && bits == 4;
                std::vector<float> o1(static_cast<size_t>(M) * N), o2(o1.size());
                QMatmulArgs a;
                a.x = X.data(); a.M = M; a.K = K; a.N = N; a.G = G; a.bits = bits; a.w = wb;
                a.sbt = sbt ? SBType::BF16 : SBType::F32;
                a.scales = sbt ? static_cast<const void*>(c.s16.data()) : c.s.data();
                a.biases = sbt ? static_cast<const void*>(c.b16.data()) : c.b.data();
                a.out = o1.data();
                qmatmul(a, ks, static_cast<MatvecMode>(mode), nullptr);
                a.out = o2.data();
                qmatmul(a, kv, static_cast<MatvecMode>(mode), &pool);
                for (int m = 0; m < M; ++m)
                  for (int n = 0; n < N; ++n) {
                    const double r = ref_dot(c, n, X.data() + static_cast<size_t>(m) * K);
                    double xn = 0;
                    for (int k = 0; k < K; ++k) xn += std::fabs(X[static_cast<size_t>(m) * K + k]);
                    double wmax = 0;
                    for (int g = 0; g < ng; ++g)
                      wmax = std::fmax(wmax, std::fabs(c.s[n * ng + g]) * ((1 << bits) - 1) +
                                                 std::fabs(c.b[n * ng + g]));
                    const double scale = wmax * xn + 1e-6;
                    const double tol = int8 ? 5e-3 : (mode != 0 ? 1e-4 : 1e-5);
                    const float v1 = o1[m * N + n], v2 = o2[m * N + n];
                    check(std::fabs(v1 - r) <= tol * scale, "driver scalar vs f64", K, N, M, G, bits, v1 - r);
                    check(std::fabs(v2 - v1) <= 1e-5 * scale, "driver simd vs scalar", K, N, M, G, bits, v2 - v1);
                  }
              }
          }
        }
      }
  // the many-row GEMM past its blocks: M over kGemmMC rows (two passes, a partial x panel), N over
  // kGemmNC rows (several chunks, a partial column panel), K over kGemmKC (a partial K block).
  for (int bits : {4, 8})
    for (const auto& kg : {std::pair<int, int>{1056, 32}, {1088, 64}, {1152, 128}})
      for (const auto& mn : {std::pair<int, int>{197, 130}, {200, 80}}) {
        const int K = kg.first, G = kg.second, M = mn.first, N = mn.second, ng = K / G;
        Case c = make_case(rng, K, N, G, bits);
        std::vector<float> X(static_cast<size_t>(M) * K), o1(static_cast<size_t>(M) * N), o2(o1.size());
        for (auto& v : X) v = nd(rng);
        QMatmulArgs a;
        a.x = X.data(); a.M = M; a.K = K; a.N = N; a.G = G; a.bits = bits;
        a.w = reinterpret_cast<const uint8_t*>(c.w.data());
        a.sbt = SBType::BF16;
        a.scales = c.s16.data();
        a.biases = c.b16.data();
        a.out = o1.data();
        qmatmul(a, ks, MatvecMode::Exact, nullptr);
        a.out = o2.data();
        qmatmul(a, kv, MatvecMode::Exact, &pool);
        for (int n = 0; n < N; ++n) {
          double wmax = 0;
          for (int g = 0; g < ng; ++g)
            wmax = std::fmax(wmax, std::fabs(c.s[n * ng + g]) * ((1 << bits) - 1) + std::fabs(c.b[n * ng + g]));
          for (int m = 0; m < M; m += (n % 7 == 0 ? 1 : 13)) {  // every row of some columns
            const float* x = X.data() + static_cast<size_t>(m) * K;
            double xn = 0;
            for (int k = 0; k < K; ++k) xn += std::fabs(x[k]);
            const double r = ref_dot(c, n, x), scale = wmax * xn + 1e-6;
            const float v1 = o1[static_cast<size_t>(m) * N + n], v2 = o2[static_cast<size_t>(m) * N + n];
            check(std::fabs(v1 - r) <= 1e-5 * scale, "big driver scalar vs f64", K, N, M, G, bits, v1 - r);
            check(std::fabs(v2 - r) <= 1e-5 * scale, "big driver simd vs f64", K, N, M, G, bits, v2 - r);
          }
        }
        ++cases;
      }
  // gemm_micro directly: partial tiles (mr < 6, nr < 16), any kc, overwrite and accumulate, against a
  // float64 reference; C entries outside the mr x nr tile must stay untouched.
  for (int mr = 1; mr <= kGemmMR; ++mr)
    for (int nr : {1, 5, 8, 15, 16})
      for (int kc : {1, 7, 8, 256}) {
        std::vector<float> xp(kGemmMR * kc), wp(kGemmNR * kc);
        for (auto& v : xp) v = nd(rng);
        for (auto& v : wp) v = nd(rng);
        const int ldc = kGemmNR + 3;
        for (int acc : {0, 1}) {
          std::vector<float> C1(kGemmMR * ldc, 1.f), C2(C1);
          ks.gemm.micro(xp.data(), wp.data(), kc, C1.data(), ldc, mr, nr, acc != 0);
          kv.gemm.micro(xp.data(), wp.data(), kc, C2.data(), ldc, mr, nr, acc != 0);
          for (int m = 0; m < kGemmMR; ++m)
            for (int n = 0; n < ldc; ++n) {
              double r = 1.0, mag = 1.0;
              if (m < mr && n < nr) {
                r = acc ? 1.0 : 0.0;
                for (int k = 0; k < kc; ++k) {
                  r += static_cast<double>(xp[k * kGemmMR + m]) * wp[k * kGemmNR + n];
                  mag += std::fabs(static_cast<double>(xp[k * kGemmMR + m]) * wp[k * kGemmNR + n]);
                }
              }
              const float v1 = C1[m * ldc + n], v2 = C2[m * ldc + n];
              check(std::fabs(v1 - r) <= 1e-5 * mag, "scalar gemm_micro vs f64", kc, nr, mr, 0, 0, v1 - r);
              check(std::fabs(v2 - r) <= 1e-5 * mag, "simd gemm_micro vs f64", kc, nr, mr, 0, 0, v2 - r);
            }
        }
        ++cases;
      }
  // softmax_row (prefill attention): SIMD exp against std::exp, causal limits n <= S
  for (int S : {1, 3, 4, 8, 9, 64, 301})
    for (int n : {1, 2, 5, 8, 64, 300, 301}) {
      if (n > S) continue;
      std::vector<float> x(S), o1(S, -1.f), o2(S, -1.f);
      for (auto& v : x) v = 8.f * nd(rng);
      ks.softmax_row(x.data(), n, S, o1.data());
      kv.softmax_row(x.data(), n, S, o2.data());
      double mx = -1e30, sum = 0;
      for (int j = 0; j < n; ++j) mx = std::fmax(mx, x[j]);
      for (int j = 0; j < n; ++j) sum += std::exp(static_cast<double>(x[j]) - mx);
      for (int j = 0; j < S; ++j) {
        const double r = j < n ? std::exp(static_cast<double>(x[j]) - mx) / sum : 0.0;
        check(std::fabs(o1[j] - r) <= 1e-5 * r + 1e-9, "scalar softmax_row vs f64", S, n, 1, 0, 0, o1[j] - r);
        check(std::fabs(o2[j] - r) <= 1e-5 * r + 1e-9, "simd softmax_row vs f64", S, n, 1, 0, 0, o2[j] - r);
      }
      ++cases;
    }
  // dot_f32 directly
  for (int rep = 0; rep < 8; ++rep)
    for (int K : {1, 7, 8, 17, 64, 1023}) {
      std::vector<float> a(K), b(K);
      for (auto& v : a) v = nd(rng);
      for (auto& v : b) v = nd(rng);
      const float r1 = ks.dot_f32(a.data(), b.data(), K), r2 = kv.dot_f32(a.data(), b.data(), K);
      check(std::fabs(r1 - r2) <= 1e-4 * K, "dot_f32", K, 1, 1, 0, 0, r1 - r2);
      ++cases;
    }
  // bfloat16 weights: dot_bf16 / cvt_bf16 directly, and the float matmul driver (bf16 and float32
  // weights, several M, K not a multiple of 8) against a float64 reference.
  auto to_bf16 = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);  // truncation: the reference uses the same values
  };
  for (int K : {1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 100, 257, 1001, 2048}) {
    for (int N : {1, 5, 17, 40}) {
      std::vector<uint16_t> wb(static_cast<size_t>(N) * K);
      std::vector<float> wf(wb.size());
      for (size_t i = 0; i < wb.size(); ++i) {
        wb[i] = to_bf16(nd(rng));
        wf[i] = bf16_to_f32(wb[i]);
      }
      for (int M : {1, 2, 3, 4, 5, 17}) {
        std::vector<float> X(static_cast<size_t>(M) * K);
        for (auto& v : X) v = nd(rng);
        if (M == 1) {
          for (int n = 0; n < N; ++n) {
            const uint16_t* row = wb.data() + static_cast<size_t>(n) * K;
            double r = 0, mag = 0;
            for (int k = 0; k < K; ++k) {
              r += static_cast<double>(wf[static_cast<size_t>(n) * K + k]) * X[k];
              mag += std::fabs(static_cast<double>(wf[static_cast<size_t>(n) * K + k]) * X[k]);
            }
            const float ds = ks.dot_bf16(row, X.data(), K), dv = kv.dot_bf16(row, X.data(), K);
            check(std::fabs(ds - r) <= 1e-5 * mag + 1e-30, "scalar dot_bf16 vs f64", K, N, 1, 0, 16, ds - r);
            check(std::fabs(dv - r) <= 1e-5 * mag + 1e-30, "simd dot_bf16 vs f64", K, N, 1, 0, 16, dv - r);
            std::vector<float> c1(K), c2(K);
            ks.cvt_bf16(row, K, c1.data());
            kv.cvt_bf16(row, K, c2.data());
            for (int k = 0; k < K; ++k)
              check(c1[k] == wf[static_cast<size_t>(n) * K + k] && c2[k] == c1[k], "cvt_bf16", K, N, 1, 0, 16,
                    c2[k] - c1[k]);
          }
        }
        for (int bf : {1, 0}) {
          std::vector<float> o1(static_cast<size_t>(M) * N), o2(o1.size());
          FMatmulArgs a;
          a.x = X.data(); a.M = M; a.K = K; a.N = N; a.bf16 = bf != 0;
          a.w = bf ? static_cast<const void*>(wb.data()) : static_cast<const void*>(wf.data());
          a.out = o1.data();
          fmatmul(a, ks, nullptr);
          a.out = o2.data();
          fmatmul(a, kv, &pool);
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
              double r = 0, mag = 0;
              for (int k = 0; k < K; ++k) {
                const double p = static_cast<double>(wf[static_cast<size_t>(n) * K + k]) * X[static_cast<size_t>(m) * K + k];
                r += p;
                mag += std::fabs(p);
              }
              const float v1 = o1[m * N + n], v2 = o2[m * N + n];
              check(std::fabs(v1 - r) <= 1e-5 * mag + 1e-30, "fmatmul scalar vs f64", K, N, M, 0, bf ? 16 : 32, v1 - r);
              check(std::fabs(v2 - r) <= 1e-5 * mag + 1e-30, "fmatmul simd vs f64", K, N, M, 0, bf ? 16 : 32, v2 - r);
            }
        }
        ++cases;
      }
    }
  }
  std::printf("%d cases, %d failures (variant %s vs scalar)\n", cases, failures, variant_name(simd));
  return failures == 0 ? 0 : 1;
}
