#pragma once

#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

#include "kernels/driver.h"

namespace csmd {

namespace mx = mlx::core;

// Validates inputs (std::invalid_argument -> ValueError) and returns a lazy
// array computed by the QMatmul primitive.
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           mx::StreamOrDevice s = {});

class QMatmul : public mx::UnaryPrimitive {
 public:
  QMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CsmdQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_;
  int bits_;
};

// Helpers shared with the other primitives.
SBType sb_type(mx::Dtype t);
// float32, bfloat16 or float16.
bool is_float_type(mx::Dtype t);
// An array's shape as Python prints a tuple, for error messages: "(2, 3)", "(4,)".
std::string shape_str(const mx::array& a);
// Copy/convert a row-contiguous float32/bfloat16/float16 array to float.
void to_float(const mx::array& a, float* out);

// The kernels compute in fp32. A primitive's input and output in another float dtype go through `buf`:
// fp32_input returns x's own data when it is fp32, else x converted into buf; fp32_output returns out's own
// data when it is fp32, else buf sized for it; store_output then converts buf into out (a no-op for fp32).
const float* fp32_input(const mx::array& x, std::vector<float>& buf);
float* fp32_output(mx::array& out, std::vector<float>& buf);
void store_output(mx::array& out, const std::vector<float>& buf);

}  // namespace csmd
