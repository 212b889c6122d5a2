// Tensor-level checks and layout helpers shared by the CPU and CUDA op wrappers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <limits>
#include <optional>

#include "geometry.h"

namespace torchpool {

// Floating dtypes only: integer or complex input gets a clear error.
inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": ", arg, " must be float16, bfloat16, float32 or float64, got ", st);
}

// The memory format a kernel works in and writes its output in: channels_last(_3d) when the
// tensor is dense in that layout (and not also plain contiguous), contiguous otherwise; any other
// strided tensor is made dense. torchpool/_fake.py applies the same rule.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !t.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

inline bool is_channels_last(at::MemoryFormat fmt) { return fmt != at::MemoryFormat::Contiguous; }

inline at::MemoryFormat channels_last_format(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// The memory format of a tensor of `dim` dims, channels-last or contiguous.
inline at::MemoryFormat layout_format(bool channels_last, int64_t dim) {
  return channels_last ? channels_last_format(dim) : at::MemoryFormat::Contiguous;
}

// The layout of a window backward's grad_input of `dim` dims: channels_last or contiguous as
// asked, else grad_output's (which cannot tell the two apart when the output has one channel or
// one cell).
inline at::MemoryFormat backward_layout(const at::Tensor& grad_output, int64_t dim,
                                        std::optional<bool> channels_last) {
  if (!channels_last.has_value()) return layout_of(grad_output);
  return layout_format(*channels_last, dim);
}

// Dtype of the saved window position: one byte while the window has at most 256 cells.
inline at::ScalarType position_dtype(const PoolGeometry& g) {
  return g.window_cells() <= 256 ? at::kByte : at::kInt;
}

// Dtype of the global max's saved cell, whose window is the whole plane of `cells` cells: the
// narrowest that holds every cell (one byte up to 256 cells, as a window's position).
inline at::ScalarType global_position_dtype(int64_t cells) {
  return cells <= 256 ? at::kByte
                      : cells <= std::numeric_limits<int32_t>::max() ? at::kInt : at::kLong;
}

// A backward asked for channels_last needs a 2d or 3d pool's input (4 or 5 dims).
inline void check_channels_last(const char* op, std::optional<bool> channels_last,
                                c10::IntArrayRef input_size) {
  TORCH_CHECK(!channels_last.value_or(false) || input_size.size() >= 4, op,
              ": channels_last needs a 2d or 3d pool input, got shape ", detail::fmt(input_size));
}

// Checks that a gradient (or saved position) has the pool's output shape.
inline void check_output_shape(const char* op, const char* arg, const at::Tensor& t,
                               const PoolGeometry& g, c10::IntArrayRef input_size) {
  const auto expected = output_shape(g, input_size);
  TORCH_CHECK(t.sizes().vec() == expected, op, ": ", arg, " must have shape ",
              detail::fmt(expected), ", got ", detail::fmt(t.sizes()));
}

// Shape (N, C) of a global pool's output, after checking the input shape.
inline void check_global_input(const char* op, c10::IntArrayRef sizes) {
  TORCH_CHECK(sizes.size() >= 3 && sizes.size() <= 5, op,
              ": expected an input with 1 to 3 spatial dims (N, C, *spatial), got shape ",
              detail::fmt(sizes));
  for (size_t d = 1; d < sizes.size(); ++d) {
    TORCH_CHECK(sizes[d] > 0, op, ": input of shape ", detail::fmt(sizes),
                " has a zero-size dim; only the batch dim may be 0");
  }
}

}  // namespace torchpool
