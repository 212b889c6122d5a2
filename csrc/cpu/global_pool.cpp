// CPU global max / average pool ops: (N, C, *spatial) -> (N, C).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/dispatch.h"

namespace torchpool::cpu {
namespace {

using at::Tensor;
using c10::IntArrayRef;

std::tuple<Tensor, Tensor> global_max_impl(const Tensor& self, bool with_pos) {
  const char* op = "global_max_pool";
  check_floating(op, "input", self);
  check_global_input(op, self.sizes());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = at::empty({self.size(0), self.size(1)}, self.options());
  Tensor pos;
  if (with_pos) pos = at::empty({self.size(0), self.size(1)}, self.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, pos};
  kernels().global_max_fwd(x, out, with_pos ? &pos : nullptr, is_channels_last(fmt));
  return {out, pos};
}

Tensor global_max_pool(const Tensor& self) { return std::get<0>(global_max_impl(self, false)); }

std::tuple<Tensor, Tensor> global_max_pool_with_pos(const Tensor& self) {
  return global_max_impl(self, true);
}

Tensor global_avg_pool(const Tensor& self) {
  const char* op = "global_avg_pool";
  check_floating(op, "input", self);
  check_global_input(op, self.sizes());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = at::empty({self.size(0), self.size(1)}, self.options());
  if (out.numel() == 0) return out;
  kernels().global_avg_fwd(x, out, is_channels_last(fmt));
  return out;
}

// Checks grad_output against input_size and allocates grad_input in the requested layout.
Tensor global_grad_input(const char* op, const Tensor& grad_output, IntArrayRef input_size,
                         bool channels_last) {
  check_floating(op, "grad_output", grad_output);
  check_global_input(op, input_size);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == input_size[0] &&
                  grad_output.size(1) == input_size[1],
              op, ": grad_output must have shape (", input_size[0], ", ", input_size[1], "), got ",
              detail::fmt(grad_output.sizes()));
  TORCH_CHECK(!channels_last || input_size.size() >= 4, op,
              ": channels_last needs a 2d or 3d pool input, got shape ", detail::fmt(input_size));
  const auto fmt = channels_last ? channels_last_format(input_size.size())
                                 : at::MemoryFormat::Contiguous;
  return at::empty(input_size, grad_output.options().memory_format(fmt));
}

Tensor global_max_pool_backward(const Tensor& grad_output, const Tensor& pos,
                                IntArrayRef input_size, bool channels_last) {
  const char* op = "global_max_pool_backward";
  Tensor gin = global_grad_input(op, grad_output, input_size, channels_last);
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.sizes() == grad_output.sizes(), op,
              ": pos must be an int64 tensor of shape ", detail::fmt(grad_output.sizes()),
              ", got ", pos.scalar_type(), " of shape ", detail::fmt(pos.sizes()));
  if (gin.numel() == 0) return gin;
  const Tensor p = pos.contiguous();
  kernels().global_bwd(grad_output.contiguous(), &p, gin, channels_last);
  return gin;
}

Tensor global_avg_pool_backward(const Tensor& grad_output, IntArrayRef input_size,
                                bool channels_last) {
  const char* op = "global_avg_pool_backward";
  Tensor gin = global_grad_input(op, grad_output, input_size, channels_last);
  if (gin.numel() == 0) return gin;
  kernels().global_bwd(grad_output.contiguous(), nullptr, gin, channels_last);
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CPU, m) {
  m.impl("global_max_pool", &global_max_pool);
  m.impl("global_max_pool_with_pos", &global_max_pool_with_pos);
  m.impl("global_max_pool_backward", &global_max_pool_backward);
  m.impl("global_avg_pool", &global_avg_pool);
  m.impl("global_avg_pool_backward", &global_avg_pool_backward);
}

}  // namespace torchpool::cpu
