// The op bodies shared by the CPU and CUDA registrations: argument checks, layout choice,
// allocation and the early return on empty tensors, then the kernel call.
//
// They are templates over a device Backend B that provides
//   * B::Guard, constructed from the device of the op's first tensor (a no-op on CPU);
//   * B::check_same_device(op, ref, ref_name, t, name) (ops with two tensor arguments) and
//     B::check_window(op, g) (max pool ops), the device's extra checks (no-ops in DefaultHooks);
//   * B::empty(shape, options), which allocates every output (at::empty in DefaultHooks; the CPU
//     backend takes large ones from its cache of freed blocks, cpu/output_cache.h);
//   * B::global_position_dtype(cells), the dtype of the global max's saved cells
//     (global_position_dtype of common.h in DefaultHooks);
//   * B::check_max_positions(op, pos, g, cl) and B::check_global_positions(op, pos, cells), the
//     checks of the saved positions given to the max backwards (not in DefaultHooks: each device
//     says what it checks);
//   * the kernels, with the signatures of cpu::Kernels (csrc/cpu/dispatch.h): all tensors dense
//     in the layout given by `cl`, outputs allocated, `pos` null when no position is written.
//     Only the kernels of the registered op families are needed.
// A device file binds its kernels in a Backend and calls register_*_ops<Backend> from its
// TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace torchpool::ops {

using at::Tensor;
using c10::IntArrayRef;

// Hooks of a device that needs no guard and no extra checks.
struct DefaultHooks {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static void check_same_device(const char*, const Tensor&, const char*, const Tensor&,
                                const char*) {}
  static void check_window(const char*, const PoolGeometry&) {}
  static Tensor empty(IntArrayRef shape, const at::TensorOptions& options) {
    return at::empty(shape, options);
  }
  static at::ScalarType global_position_dtype(int64_t cells) {
    return torchpool::global_position_dtype(cells);
  }
};

// Allocates an op's output.
template <typename B>
Tensor new_output(IntArrayRef shape, const at::TensorOptions& options) {
  return B::empty(shape, options);
}

// ---------------------------------------------------------------------------------------------
// Max pool.

template <typename B>
std::tuple<Tensor, Tensor> max_pool_impl(const Tensor& self, IntArrayRef kernel, IntArrayRef stride,
                                         IntArrayRef pad_before, IntArrayRef pad_after,
                                         IntArrayRef dilation, bool ceil_mode, bool with_pos) {
  const char* op = "max_pool";
  check_floating(op, "input", self);
  const PoolGeometry g =
      make_geometry(op, self.sizes(), kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  B::check_window(op, g);
  const typename B::Guard guard(self.device());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  const auto shape = output_shape(g, self.sizes());
  Tensor out = new_output<B>(shape, self.options().memory_format(fmt));
  Tensor pos;
  if (with_pos) {
    pos = new_output<B>(shape, self.options().dtype(position_dtype(g)).memory_format(fmt));
  }
  if (out.numel() == 0) return {out, pos};
  B::max_fwd(x, out, with_pos ? &pos : nullptr, g, is_channels_last(fmt));
  return {out, pos};
}

template <typename B>
Tensor max_pool(const Tensor& self, IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                IntArrayRef pad_after, IntArrayRef dilation, bool ceil_mode) {
  return std::get<0>(
      max_pool_impl<B>(self, kernel, stride, pad_before, pad_after, dilation, ceil_mode, false));
}

template <typename B>
std::tuple<Tensor, Tensor> max_pool_with_pos(const Tensor& self, IntArrayRef kernel,
                                             IntArrayRef stride, IntArrayRef pad_before,
                                             IntArrayRef pad_after, IntArrayRef dilation,
                                             bool ceil_mode) {
  return max_pool_impl<B>(self, kernel, stride, pad_before, pad_after, dilation, ceil_mode, true);
}

// Checks a saved position tensor against the geometry; returns it dense in `fmt`.
inline Tensor checked_pos(const char* op, const Tensor& pos, const PoolGeometry& g,
                          IntArrayRef input_size, at::MemoryFormat fmt) {
  TORCH_CHECK(pos.scalar_type() == position_dtype(g), op, ": pos must have dtype ",
              position_dtype(g), " for a window of ", g.window_cells(), " cells, got ",
              pos.scalar_type());
  check_output_shape(op, "pos", pos, g, input_size);
  return pos.contiguous(fmt);
}

template <typename B>
Tensor max_pool_backward(const Tensor& grad_output, const Tensor& pos, IntArrayRef input_size,
                         IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                         IntArrayRef pad_after, IntArrayRef dilation, bool ceil_mode,
                         std::optional<bool> channels_last, bool check_pos) {
  const char* op = "max_pool_backward";
  check_floating(op, "grad_output", grad_output);
  B::check_same_device(op, grad_output, "grad_output", pos, "pos");
  const PoolGeometry g =
      make_geometry(op, input_size, kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  B::check_window(op, g);
  check_output_shape(op, "grad_output", grad_output, g, input_size);
  check_channels_last(op, channels_last, input_size);
  const typename B::Guard guard(grad_output.device());
  const auto fmt = backward_layout(grad_output, input_size.size(), channels_last);
  const Tensor go = grad_output.contiguous(fmt);
  const Tensor p = checked_pos(op, pos, g, input_size, fmt);
  Tensor gin = new_output<B>(input_size, grad_output.options().memory_format(fmt));
  if (gin.numel() == 0) return gin;
  if (check_pos) B::check_max_positions(op, p, g, is_channels_last(fmt));
  B::max_bwd(go, p, gin, g, is_channels_last(fmt));
  return gin;
}

template <typename B>
Tensor max_pool_indices(const Tensor& pos, IntArrayRef input_size, IntArrayRef kernel,
                        IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                        IntArrayRef dilation, bool ceil_mode, bool check_pos) {
  const char* op = "max_pool_indices";
  const PoolGeometry g =
      make_geometry(op, input_size, kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  B::check_window(op, g);
  const typename B::Guard guard(pos.device());
  const auto fmt = layout_of(pos);
  const Tensor p = checked_pos(op, pos, g, input_size, fmt);
  Tensor idx = new_output<B>(p.sizes(), p.options().dtype(at::kLong).memory_format(fmt));
  if (idx.numel() == 0) return idx;
  if (check_pos) B::check_max_positions(op, p, g, is_channels_last(fmt));
  B::max_indices(p, idx, g, is_channels_last(fmt));
  return idx;
}

template <typename B>
void register_max_pool_ops(torch::Library& m) {
  m.impl("max_pool", &max_pool<B>);
  m.impl("max_pool_with_pos", &max_pool_with_pos<B>);
  m.impl("max_pool_backward", &max_pool_backward<B>);
  m.impl("max_pool_indices", &max_pool_indices<B>);
}

// ---------------------------------------------------------------------------------------------
// Average pool.

// Average pools have no dilation.
inline PoolGeometry avg_geometry(const char* op, IntArrayRef sizes, IntArrayRef kernel,
                                 IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                                 bool ceil_mode, std::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": divisor_override must be non-zero");
  const std::vector<int64_t> ones(kernel.size(), 1);
  return make_geometry(op, sizes, kernel, stride, pad_before, pad_after, ones, ceil_mode);
}

template <typename B>
Tensor avg_pool(const Tensor& self, IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                IntArrayRef pad_after, bool ceil_mode, bool count_include_pad,
                std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool";
  check_floating(op, "input", self);
  const PoolGeometry g = avg_geometry(op, self.sizes(), kernel, stride, pad_before, pad_after,
                                      ceil_mode, divisor_override);
  const typename B::Guard guard(self.device());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = new_output<B>(output_shape(g, self.sizes()), self.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  B::avg_fwd(x, out, g, is_channels_last(fmt), count_include_pad, divisor_override.value_or(0));
  return out;
}

template <typename B>
Tensor avg_pool_backward(const Tensor& grad_output, IntArrayRef input_size, IntArrayRef kernel,
                         IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                         bool ceil_mode, bool count_include_pad,
                         std::optional<int64_t> divisor_override,
                         std::optional<bool> channels_last) {
  const char* op = "avg_pool_backward";
  check_floating(op, "grad_output", grad_output);
  const PoolGeometry g = avg_geometry(op, input_size, kernel, stride, pad_before, pad_after,
                                      ceil_mode, divisor_override);
  check_output_shape(op, "grad_output", grad_output, g, input_size);
  check_channels_last(op, channels_last, input_size);
  const typename B::Guard guard(grad_output.device());
  const auto fmt = backward_layout(grad_output, input_size.size(), channels_last);
  const Tensor go = grad_output.contiguous(fmt);
  Tensor gin = new_output<B>(input_size, grad_output.options().memory_format(fmt));
  if (gin.numel() == 0) return gin;
  B::avg_bwd(go, gin, g, is_channels_last(fmt), count_include_pad, divisor_override.value_or(0));
  return gin;
}

template <typename B>
void register_avg_pool_ops(torch::Library& m) {
  m.impl("avg_pool", &avg_pool<B>);
  m.impl("avg_pool_backward", &avg_pool_backward<B>);
}

// ---------------------------------------------------------------------------------------------
// Global max / average pool: (N, C, *spatial) -> (N, C).

template <typename B>
std::tuple<Tensor, Tensor> global_max_impl(const Tensor& self, bool with_pos) {
  const char* op = "global_max_pool";
  check_floating(op, "input", self);
  check_global_input(op, self.sizes());
  const typename B::Guard guard(self.device());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = new_output<B>({self.size(0), self.size(1)}, self.options());
  Tensor pos;
  if (with_pos) {
    pos = new_output<B>({self.size(0), self.size(1)},
                        self.options().dtype(B::global_position_dtype(plane_cells(self.sizes()))));
  }
  if (out.numel() == 0) return {out, pos};
  B::global_max_fwd(x, out, with_pos ? &pos : nullptr, is_channels_last(fmt));
  return {out, pos};
}

template <typename B>
Tensor global_max_pool(const Tensor& self) {
  return std::get<0>(global_max_impl<B>(self, false));
}

template <typename B>
std::tuple<Tensor, Tensor> global_max_pool_with_pos(const Tensor& self) {
  return global_max_impl<B>(self, true);
}

template <typename B>
Tensor global_avg_pool(const Tensor& self) {
  const char* op = "global_avg_pool";
  check_floating(op, "input", self);
  check_global_input(op, self.sizes());
  const typename B::Guard guard(self.device());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = new_output<B>({self.size(0), self.size(1)}, self.options());
  if (out.numel() == 0) return out;
  B::global_avg_fwd(x, out, is_channels_last(fmt));
  return out;
}

// Checks grad_output against input_size and allocates grad_input in the requested layout.
template <typename B>
Tensor global_grad_input(const char* op, const Tensor& grad_output, IntArrayRef input_size,
                                bool channels_last) {
  check_floating(op, "grad_output", grad_output);
  check_global_input(op, input_size);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == input_size[0] &&
                  grad_output.size(1) == input_size[1],
              op, ": grad_output must have shape (", input_size[0], ", ", input_size[1], "), got ",
              detail::fmt(grad_output.sizes()));
  check_channels_last(op, channels_last, input_size);
  const auto fmt = layout_format(channels_last, input_size.size());
  return new_output<B>(input_size, grad_output.options().memory_format(fmt));
}

// Checks the saved cells given for an input of input_size (already checked): dtype `dtype` (or
// any integer dtype where it is not given), shape (N, C); returns them contiguous.
inline Tensor checked_global_pos(const char* op, const Tensor& pos, IntArrayRef input_size,
                                 std::optional<at::ScalarType> dtype) {
  const IntArrayRef nc = input_size.slice(0, 2);
  const bool dtype_ok = dtype ? pos.scalar_type() == *dtype
                              : at::isIntegralType(pos.scalar_type(), /*includeBool=*/false);
  TORCH_CHECK(dtype_ok && pos.sizes() == nc, op, ": pos must be a",
              dtype ? std::string(" ") + c10::toString(*dtype) : std::string("n integer"),
              " tensor of shape ", detail::fmt(nc), " (the cells of planes of ",
              plane_cells(input_size), "), got ", pos.scalar_type(), " of shape ",
              detail::fmt(pos.sizes()));
  return pos.contiguous();
}

template <typename B>
Tensor global_max_pool_backward(const Tensor& grad_output, const Tensor& pos,
                                IntArrayRef input_size, bool channels_last, bool check_pos) {
  const char* op = "global_max_pool_backward";
  B::check_same_device(op, grad_output, "grad_output", pos, "pos");
  const typename B::Guard guard(grad_output.device());
  Tensor gin = global_grad_input<B>(op, grad_output, input_size, channels_last);
  const Tensor p = checked_global_pos(op, pos, input_size,
                                      B::global_position_dtype(plane_cells(input_size)));
  if (gin.numel() == 0) return gin;
  if (check_pos) B::check_global_positions(op, p, plane_cells(input_size));
  B::global_bwd(grad_output.contiguous(), &p, gin, channels_last);
  return gin;
}

template <typename B>
Tensor global_avg_pool_backward(const Tensor& grad_output, IntArrayRef input_size,
                                bool channels_last) {
  const char* op = "global_avg_pool_backward";
  const typename B::Guard guard(grad_output.device());
  Tensor gin = global_grad_input<B>(op, grad_output, input_size, channels_last);
  if (gin.numel() == 0) return gin;
  B::global_bwd(grad_output.contiguous(), nullptr, gin, channels_last);
  return gin;
}

template <typename B>
void register_global_pool_ops(torch::Library& m) {
  m.impl("global_max_pool", &global_max_pool<B>);
  m.impl("global_max_pool_with_pos", &global_max_pool_with_pos<B>);
  m.impl("global_max_pool_backward", &global_max_pool_backward<B>);
  m.impl("global_avg_pool", &global_avg_pool<B>);
  m.impl("global_avg_pool_backward", &global_avg_pool_backward<B>);
}

}  // namespace torchpool::ops
