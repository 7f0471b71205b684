#pragma once

#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

#include "kernels/qmatmul_driver.h"

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

// The products x @ w.T (matmul, quantized_matmul): the checks of x they share (std::invalid_argument
// "<op>: ..."), the output's shape (x's, with N in the last dimension), and the CPU evaluation's frame:
// product(xf, M, out) on x's M rows in fp32 (converted if x is not) into out's fp32 data, then stored.
void check_product_x(const char* op, const mx::array& x);
mx::Shape product_shape(const mx::array& x, int N);
template <class Product>
void eval_product_fp32(const mx::array& x, mx::array& out, Product product) {
  const int M = static_cast<int>(x.size() / x.shape(-1));
  if (M == 0) return;
  std::vector<float> xbuf, obuf;
  const float* xf = fp32_input(x, xbuf);
  float* of = fp32_output(out, obuf);
  product(xf, M, of);
  store_output(out, obuf);
}

}  // namespace csmd
