#include "attention.h"

#include <stdexcept>

#include "dispatch.h"
#include "kernels/causal_softmax.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

mx::array causal_softmax(const mx::array& scores, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("causal_softmax: " + msg); };
  if (!is_float_type(scores.dtype()))
    fail("scores must be float32, bfloat16 or float16");
  if (scores.ndim() < 2) fail("scores must have at least two dimensions [..., T, S]");
  const int T = scores.shape(-2), S = scores.shape(-1);
  if (T < 1 || S < T)
    fail("scores [..., T, S] need S >= T >= 1, got T=" + std::to_string(T) + ", S=" + std::to_string(S));
  auto st = mx::to_stream(s);
  return mx::array(scores.shape(), scores.dtype(), std::make_shared<CausalSoftmax>(st),
                   {scores});
}

void CausalSoftmax::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.causal_softmax runs on the CPU only");
}

void CausalSoftmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(stream(), inputs, out, [](std::vector<mx::array>& ins, mx::array& out) {
    const mx::array& x = ins[0];
    const int T = x.shape(-2), S = x.shape(-1);
    const int rows = static_cast<int>(x.size() / S);
    if (rows == 0) return;
    std::vector<float> xbuf, obuf;
    const float* xf = fp32_input(x, xbuf);
    float* of = fp32_output(out, obuf);
    causal_softmax_rows(xf, of, rows, T, S, current_kernels(), &pool());
    store_output(out, obuf);
  });
}

}  // namespace csmd
