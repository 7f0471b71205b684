#include "activations.h"

#include <stdexcept>

#include "dispatch.h"
#include "kernels/elu.h"
#include "qmatmul.h"
#include "state.h"

namespace csmd {

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32)
    throw std::invalid_argument("swiglu: gate and up must be float32");
  if (gate.shape() != up.shape())
    throw std::invalid_argument("swiglu: gate " + shape_str(gate) + " and up " + shape_str(up) +
                                " must have one shape");
  return mx::array(gate.shape(), mx::float32, std::make_shared<Swiglu>(mx::to_stream(s)), {gate, up});
}

void Swiglu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("csmd_native.swiglu runs on the CPU only");
}

void Swiglu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_cpu(
      stream(), inputs, out,
      [](std::vector<mx::array>& ins, mx::array& out) {
        silu_mul_pooled(silu_mul_kernel(current_variant()), ins[0].data<float>(), ins[1].data<float>(), out.size(),
                        out.data<float>(), pool());
      },
      0);  // the gate's buffer when MLX can donate it: each value is read before it is written
}

}  // namespace csmd
