#include "matmul.h"

#include <stdexcept>

#include "dispatch.h"
#include "kernels/fmatmul_driver.h"
#include "kernels/fewrows.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

namespace {

// Up to this many rows of x, csmd_native.matmul reads each weight row once for all of them (kernels/fewrows.h)
// rather than running its blocked GEMM (fmatmul_driver.h), which converts and packs every weight block. This is
// the crossover against that GEMM only; csmd.kernels.FEW_ROWS (4) is another one, where Python chooses between
// this product and BLAS or the panel GEMM, which overtake it sooner.
constexpr int kMatmulFewRowsMax = 8;
// From this many rows on, bf16 weights take the bf16 GEMM when the prefill setting allows it (BENCHMARKS.md,
// "bf16 prefill"); fp32 weights always keep the fp32 GEMM.
constexpr int kMatmulBf16Rows = kMatmulFewRowsMax + 1;

}  // namespace

mx::array matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("matmul: " + msg); };
  check_product_x("matmul", x);
  if (!(w.dtype() == mx::bfloat16 || w.dtype() == mx::float32)) fail("w must be bfloat16 or float32");
  if (w.ndim() != 2) fail("w must be 2-D [out, in], got shape " + shape_str(w));
  const int K = x.shape(-1);
  if (w.shape(1) != K)
    fail("x has " + std::to_string(K) + " input features but w " + shape_str(w) + " has " +
         std::to_string(w.shape(1)));
  if (w.shape(0) == 0 || K == 0) fail("empty weight matrix");
  return mx::array(product_shape(x, w.shape(0)), x.dtype(), std::make_shared<FMatmul>(mx::to_stream(s)), {x, w});
}

std::vector<mx::Shape> FMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {product_shape(inputs[0], inputs[1].shape(0))};
}

void few_rows_product(const mx::array& w, const float* x, int M, float* out) {
  FewRowsArgs a;
  a.x = x;
  a.M = M;
  a.K = w.shape(1);
  a.N = w.shape(0);
  a.bf16 = w.dtype() == mx::bfloat16;
  a.w = a.bf16 ? static_cast<const void*>(w.data<mx::bfloat16_t>()) : static_cast<const void*>(w.data<float>());
  a.out = out;
  fewrows_matmul(a, fewrows_kernel(current_variant()), pool());
}

void FMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.matmul runs on the CPU only; use x @ w.T on the GPU (or pass stream=mx.cpu)");
}

void FMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(stream(), inputs, out, [](std::vector<mx::array>& ins, mx::array& out) {
    const mx::array &x = ins[0], &w = ins[1];
    eval_product_fp32(x, out, [&](const float* xf, int M, float* of) {
      if (M >= 2 && M <= kMatmulFewRowsMax) {  // weight-bound: read each weight row once for all rows
        few_rows_product(w, xf, M, of);
        return;
      }
      FMatmulArgs a;
      a.x = xf;
      a.M = M;
      a.K = x.shape(-1);
      a.N = w.shape(0);
      a.bf16 = w.dtype() == mx::bfloat16;
      a.w = a.bf16 ? static_cast<const void*>(w.data<mx::bfloat16_t>()) : static_cast<const void*>(w.data<float>());
      a.out = of;
      if (a.bf16 && M >= kMatmulBf16Rows && prefill_bf16())
        fgemm_bf16(a, current_kernels().bf16, &pool());
      else
        fmatmul(a, current_kernels(), &pool());
    });
  });
}

}  // namespace csmd
