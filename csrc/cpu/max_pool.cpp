// CPU max pool ops: argument checks, layout and allocation; the loops are in kernels.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/dispatch.h"

namespace torchpool::cpu {
namespace {

using at::Tensor;
using c10::IntArrayRef;

std::tuple<Tensor, Tensor> max_pool_impl(const Tensor& self, IntArrayRef kernel, IntArrayRef stride,
                                         IntArrayRef pad_before, IntArrayRef pad_after,
                                         IntArrayRef dilation, bool ceil_mode, bool with_pos) {
  const char* op = "max_pool";
  check_floating(op, "input", self);
  const PoolGeometry g =
      make_geometry(op, self.sizes(), kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  const auto shape = output_shape(g, self.sizes());
  Tensor out = at::empty(shape, self.options().memory_format(fmt));
  Tensor pos;
  if (with_pos) pos = at::empty(shape, self.options().dtype(position_dtype(g)).memory_format(fmt));
  if (out.numel() == 0) return {out, pos};
  kernels().max_fwd(x, out, with_pos ? &pos : nullptr, g, is_channels_last(fmt));
  return {out, pos};
}

Tensor max_pool(const Tensor& self, IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                IntArrayRef pad_after, IntArrayRef dilation, bool ceil_mode) {
  return std::get<0>(
      max_pool_impl(self, kernel, stride, pad_before, pad_after, dilation, ceil_mode, false));
}

std::tuple<Tensor, Tensor> max_pool_with_pos(const Tensor& self, IntArrayRef kernel,
                                             IntArrayRef stride, IntArrayRef pad_before,
                                             IntArrayRef pad_after, IntArrayRef dilation,
                                             bool ceil_mode) {
  return max_pool_impl(self, kernel, stride, pad_before, pad_after, dilation, ceil_mode, true);
}

// Checks a saved position tensor against the geometry; returns it dense in `fmt`.
Tensor checked_pos(const char* op, const Tensor& pos, const PoolGeometry& g, IntArrayRef input_size,
                   at::MemoryFormat fmt) {
  TORCH_CHECK(pos.scalar_type() == position_dtype(g), op, ": pos must have dtype ",
              position_dtype(g), " for a window of ", g.window_cells(), " cells, got ",
              pos.scalar_type());
  check_output_shape(op, "pos", pos, g, input_size);
  return pos.contiguous(fmt);
}

Tensor max_pool_backward(const Tensor& grad_output, const Tensor& pos, IntArrayRef input_size,
                         IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                         IntArrayRef pad_after, IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool_backward";
  check_floating(op, "grad_output", grad_output);
  const PoolGeometry g =
      make_geometry(op, input_size, kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  check_output_shape(op, "grad_output", grad_output, g, input_size);
  const auto fmt = layout_of(grad_output);
  const Tensor go = grad_output.contiguous(fmt);
  const Tensor p = checked_pos(op, pos, g, input_size, fmt);
  Tensor gin = at::empty(input_size, grad_output.options().memory_format(fmt));
  if (gin.numel() == 0) return gin;
  kernels().max_bwd(go, p, gin, g, is_channels_last(fmt));
  return gin;
}

Tensor max_pool_indices(const Tensor& pos, IntArrayRef input_size, IntArrayRef kernel,
                        IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                        IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool_indices";
  const PoolGeometry g =
      make_geometry(op, input_size, kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  const auto fmt = layout_of(pos);
  const Tensor p = checked_pos(op, pos, g, input_size, fmt);
  Tensor idx = at::empty(p.sizes(), p.options().dtype(at::kLong).memory_format(fmt));
  if (idx.numel() == 0) return idx;
  kernels().max_indices(p, idx, g, is_channels_last(fmt));
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CPU, m) {
  m.impl("max_pool", &max_pool);
  m.impl("max_pool_with_pos", &max_pool_with_pos);
  m.impl("max_pool_backward", &max_pool_backward);
  m.impl("max_pool_indices", &max_pool_indices);
}

}  // namespace torchpool::cpu
