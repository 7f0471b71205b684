#include "matmul.h"

#include <stdexcept>

#include "dispatch.h"
#include "kernels/driver.h"
#include "kernels/fewrows.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

namespace {

// Up to this many rows of x, products read each weight row once for all of them (kernels/fewrows.h).
constexpr int kFewRowsMax = 8;

}  // namespace

mx::array matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("matmul: " + msg); };
  if (!is_float_type(x.dtype()))
    fail("x must be float32, bfloat16 or float16");
  if (x.ndim() < 1) fail("x must have at least one dimension");
  if (!(w.dtype() == mx::bfloat16 || w.dtype() == mx::float32)) fail("w must be bfloat16 or float32");
  if (w.ndim() != 2) fail("w must be 2-D [out, in], got shape " + shape_str(w));
  const int K = x.shape(-1);
  if (w.shape(1) != K)
    fail("x has " + std::to_string(K) + " input features but w " + shape_str(w) + " has " +
         std::to_string(w.shape(1)));
  if (w.shape(0) == 0 || K == 0) fail("empty weight matrix");
  auto st = mx::to_stream(s);
  mx::Shape out_shape = x.shape();
  out_shape.back() = w.shape(0);
  return mx::array(out_shape, x.dtype(), std::make_shared<FMatmul>(st),
                   {x, w});
}

std::vector<mx::Shape> FMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape sh = inputs[0].shape();
  sh.back() = inputs[1].shape(0);
  return {sh};
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
    const int K = x.shape(-1);
    const int N = w.shape(0);
    const int M = static_cast<int>(x.size() / K);
    if (M == 0) return;
    std::vector<float> xbuf, obuf;
    const float* xf = fp32_input(x, xbuf);
    float* of = fp32_output(out, obuf);
    if (M >= 2 && M <= kFewRowsMax) {  // weight-bound: read each weight row once for all rows
      few_rows_product(w, xf, M, of);
      store_output(out, obuf);
      return;
    }
    FMatmulArgs a;
    a.x = xf;
    a.M = M;
    a.K = K;
    a.N = N;
    a.bf16 = w.dtype() == mx::bfloat16;
    a.w = a.bf16 ? static_cast<const void*>(w.data<mx::bfloat16_t>()) : static_cast<const void*>(w.data<float>());
    a.out = of;
    fmatmul(a, current_kernels(), &pool());
    store_output(out, obuf);
  });
}

}  // namespace csmd
