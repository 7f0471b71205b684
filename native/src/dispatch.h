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

// work(ins, outs), with ins and outs the weak copies of inputs and outputs.
template <class Work>
void dispatch_cpu(const mx::Stream& stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
                  Work work) {
  for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
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
void dispatch_cpu(const mx::Stream& stream, const std::vector<mx::array>& inputs, mx::array& output, Work work) {
  std::vector<mx::array> outputs = {output};  // a handle to the same array: its data is set through it
  dispatch_cpu(stream, inputs, outputs,
               [work = std::move(work)](std::vector<mx::array>& ins, std::vector<mx::array>& outs) mutable {
                 work(ins, outs[0]);
               });
}

}  // namespace csmd
