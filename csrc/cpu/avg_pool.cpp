// CPU average pool ops: argument checks, layout and allocation; the loops are in kernels.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/dispatch.h"

namespace torchpool::cpu {
namespace {

using at::Tensor;
using c10::IntArrayRef;

// Average pools have no dilation.
PoolGeometry avg_geometry(const char* op, IntArrayRef sizes, IntArrayRef kernel, IntArrayRef stride,
                          IntArrayRef pad_before, IntArrayRef pad_after, bool ceil_mode,
                          std::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": divisor_override must be non-zero");
  const std::vector<int64_t> ones(kernel.size(), 1);
  return make_geometry(op, sizes, kernel, stride, pad_before, pad_after, ones, ceil_mode);
}

Tensor avg_pool(const Tensor& self, IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                IntArrayRef pad_after, bool ceil_mode, bool count_include_pad,
                std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool";
  check_floating(op, "input", self);
  const PoolGeometry g = avg_geometry(op, self.sizes(), kernel, stride, pad_before, pad_after,
                                      ceil_mode, divisor_override);
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = at::empty(output_shape(g, self.sizes()), self.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  kernels().avg_fwd(x, out, g, is_channels_last(fmt), count_include_pad,
                    divisor_override.value_or(0));
  return out;
}

Tensor avg_pool_backward(const Tensor& grad_output, IntArrayRef input_size, IntArrayRef kernel,
                         IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                         bool ceil_mode, bool count_include_pad,
                         std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool_backward";
  check_floating(op, "grad_output", grad_output);
  const PoolGeometry g = avg_geometry(op, input_size, kernel, stride, pad_before, pad_after,
                                      ceil_mode, divisor_override);
  check_output_shape(op, "grad_output", grad_output, g, input_size);
  const auto fmt = layout_of(grad_output);
  const Tensor go = grad_output.contiguous(fmt);
  Tensor gin = at::empty(input_size, grad_output.options().memory_format(fmt));
  if (gin.numel() == 0) return gin;
  kernels().avg_bwd(go, gin, g, is_channels_last(fmt), count_include_pad,
                    divisor_override.value_or(0));
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CPU, m) {
  m.impl("avg_pool", &avg_pool);
  m.impl("avg_pool_backward", &avg_pool_backward);
}

}  // namespace torchpool::cpu
