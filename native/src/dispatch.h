// MLX's CPU-dispatch idiom, once for every primitive's eval_cpu: allocate the outputs, register every input
// and output with the stream's command encoder (which keeps them alive and orders the work), and run the
// work on the stream's thread with weak copies of them (the task may run after eval_cpu has returned).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"

namespace csmd {

namespace mx = mlx::core;

// A row-contiguous copy of `a`, whatever its strides (a transposed, sliced or broadcast view).
inline mx::array row_contiguous_copy(const mx::array& a) {
  mx::array out(mx::allocator::malloc(a.nbytes()), a.shape(), a.dtype());
  const int nd = a.ndim();
  const size_t item = a.itemsize();
  const size_t inner = nd ? static_cast<size_t>(a.shape(nd - 1)) : 1;
  const int64_t inner_stride = nd ? a.strides(nd - 1) : 1;
  const char* src = a.data<char>();
  char* dst = out.data<char>();
  std::vector<int> index(std::max(nd - 1, 0), 0);  // the position in the outer dimensions
  for (size_t row = 0; row < a.size() / std::max<size_t>(inner, 1); ++row) {
    int64_t offset = 0;
    for (int d = 0; d < nd - 1; ++d) offset += index[d] * a.strides(d);
    const char* from = src + offset * static_cast<int64_t>(item);
    if (inner_stride == 1) {
      std::memcpy(dst, from, inner * item);
    } else {
      for (size_t j = 0; j < inner; ++j) std::memcpy(dst + j * item, from + j * inner_stride * item, item);
    }
    dst += inner * item;
    for (int d = nd - 2; d >= 0 && ++index[d] == a.shape(d); --d) index[d] = 0;  // next outer position
  }
  return out;
}

// work(ins, outs), with ins and outs the weak copies of inputs and outputs.
//
// The kernels read every input row-contiguous. An input that is not (a transposed or sliced view) is copied
// in the task, when its layout is known, rather than through a Contiguous node when the graph is built: such a
// node is one more for MLX to schedule at every call, for an array that nearly always turns out contiguous
// (a decoded Mimi frame had 33 of them, and 140 more for the weights before those were passed as they are).
//
// donor >= 0: output 0 takes over input `donor`'s buffer when MLX allows it (nothing else holds that input:
// a state array its owner let go of before the eval), so work can update it in place; otherwise output 0
// gets a buffer of its own, and work, which tells the two cases apart by their data pointers, must fill it.
template <class Work>
void dispatch_cpu(const mx::Stream& stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
                  Work work, int donor = -1) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    auto& out = outputs[i];
    const mx::array* in = i == 0 && donor >= 0 ? &inputs[donor] : nullptr;
    if (in && in->is_donatable() && in->flags().row_contiguous && in->dtype() == out.dtype() &&
        in->shape() == out.shape())
      out.copy_shared_buffer(*in);
    else
      out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& enc = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> ins, outs;
  std::vector<bool> gather;  // inputs to copy row-contiguous in the task, once their data exists
  for (const auto& a : inputs) {
    enc.set_input_array(a);
    ins.push_back(mx::array::unsafe_weak_copy(a));
    gather.push_back(!a.flags().row_contiguous);
  }
  for (auto& a : outputs) {
    enc.set_output_array(a);
    outs.push_back(mx::array::unsafe_weak_copy(a));
  }
  enc.dispatch([ins = std::move(ins), outs = std::move(outs), gather = std::move(gather),
                work = std::move(work)]() mutable {
    for (size_t i = 0; i < ins.size(); ++i)
      if (gather[i]) ins[i] = row_contiguous_copy(ins[i]);
    work(ins, outs);
  });
}

// The same for a primitive with one output: work(ins, out).
template <class Work>
void dispatch_cpu(const mx::Stream& stream, const std::vector<mx::array>& inputs, mx::array& output, Work work,
                  int donor = -1) {
  std::vector<mx::array> outputs = {output};  // a handle to the same array: its data is set through it
  dispatch_cpu(
      stream, inputs, outputs,
      [work = std::move(work)](std::vector<mx::array>& ins, std::vector<mx::array>& outs) mutable {
        work(ins, outs[0]);
      },
      donor);
}

}  // namespace csmd
