// MLX's CPU-dispatch idiom, once for every primitive's eval_cpu: allocate the outputs, register every input
// and output with the stream's command encoder (which keeps them alive and orders the work), and run the
// work on the stream's thread with weak copies of them (the task may run after eval_cpu has returned).
#pragma once

#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"

namespace csmd {

namespace mx = mlx::core;

// A primitive's input as the kernels read it, row-contiguous: `a` itself when it is already evaluated that way
// (every weight), else a Contiguous node, which costs nothing to run for an array that turns out contiguous
// but is one more node for MLX to schedule at every call (140 of the 267 of a decoded Mimi frame went to the
// weights before). Also, a node sharing the buffer of `a` keeps it referenced until its task has run, which
// would stop MLX from donating that buffer to this primitive (see donor below).
inline mx::array contiguous_input(const mx::array& a, const mx::Stream& s) {
  return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, s);
}

// work(ins, outs), with ins and outs the weak copies of inputs and outputs.
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
  for (const auto& a : inputs) {
    enc.set_input_array(a);
    ins.push_back(mx::array::unsafe_weak_copy(a));
  }
  for (auto& a : outputs) {
    enc.set_output_array(a);
    outs.push_back(mx::array::unsafe_weak_copy(a));
  }
  enc.dispatch([ins = std::move(ins), outs = std::move(outs), work = std::move(work)]() mutable { work(ins, outs); });
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
