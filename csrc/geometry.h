// Pooling geometry shared by the CPU and CUDA kernels.
//
// Every pool is handled as a 3-d pool: a 1d or 2d pool is stored right-aligned with unit leading
// dimensions (kernel 1, stride 1, no padding), so one implementation serves 1d, 2d and 3d.
// The struct is plain data so it can be passed by value to a CUDA kernel; its helpers are
// C10_HOST_DEVICE so the window math exists once for both devices.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace torchpool {

constexpr int kDims = 3;

struct PoolGeometry {
  int64_t in[kDims];
  int64_t out[kDims];
  int64_t kernel[kDims];
  int64_t stride[kDims];
  int64_t pad[kDims];        // padding before (left/top/front)
  int64_t pad_after[kDims];  // padding after (right/bottom/back)
  int64_t dilation[kDims];
  int ndim;                  // spatial dims the user gave (1..3)

  // Number of cells in one window (the range of a saved window position).
  C10_HOST_DEVICE int64_t window_cells() const {
    return kernel[0] * kernel[1] * kernel[2];
  }
  C10_HOST_DEVICE int64_t in_plane() const { return in[0] * in[1] * in[2]; }
  C10_HOST_DEVICE int64_t out_plane() const { return out[0] * out[1] * out[2]; }

  // Input coordinate of window cell k of output o along dim d (may lie in the padding).
  C10_HOST_DEVICE int64_t input_coord(int d, int64_t o, int64_t k) const {
    return o * stride[d] - pad[d] + k * dilation[d];
  }

  // Range [lo, hi) of window cells k whose input coordinate lies inside the input.
  C10_HOST_DEVICE void valid_cells(int d, int64_t o, int64_t& lo, int64_t& hi) const {
    const int64_t start = o * stride[d] - pad[d];
    const int64_t dil = dilation[d];
    lo = start >= 0 ? 0 : (-start + dil - 1) / dil;
    const int64_t last = in[d] - 1 - start;  // largest k*dil that stays inside
    hi = last < 0 ? 0 : last / dil + 1;
    if (hi > kernel[d]) hi = kernel[d];
    if (lo > hi) lo = hi;
  }

  // Range [lo, hi) of outputs o whose window can contain input coordinate i along dim d.
  C10_HOST_DEVICE void covering_outputs(int d, int64_t i, int64_t& lo, int64_t& hi) const {
    const int64_t span = (kernel[d] - 1) * dilation[d];
    const int64_t first = i + pad[d] - span;  // o*stride >= first
    lo = first <= 0 ? 0 : (first + stride[d] - 1) / stride[d];
    hi = (i + pad[d]) / stride[d] + 1;
    if (hi > out[d]) hi = out[d];
    if (lo > hi) lo = hi;
  }

  // Average-pool divisor factor along dim d for output o, as torch computes it: the window is
  // clipped to the padded extent, then (unless count_include_pad) to the input.
  C10_HOST_DEVICE int64_t avg_count(int d, int64_t o, bool count_include_pad) const {
    int64_t start = o * stride[d] - pad[d];
    int64_t end = start + kernel[d];
    const int64_t padded_end = in[d] + pad_after[d];
    if (end > padded_end) end = padded_end;
    if (count_include_pad) return end - start;
    if (start < 0) start = 0;
    if (end > in[d]) end = in[d];
    return end - start;
  }
};

// torch's output-size rule (pooling_output_shape_pad_lr): in ceil mode the last window must start
// inside the input or the left padding.
inline int64_t pool_output_size(int64_t in, int64_t k, int64_t s, int64_t pb, int64_t pa,
                                int64_t dil, bool ceil_mode) {
  const int64_t num = in + pb + pa - dil * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // floor division that rounds toward -inf
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && out > 0 && (out - 1) * s >= in + pb) --out;
  return out;
}

namespace detail {
inline std::string fmt(c10::IntArrayRef v) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  if (v.size() == 1) os << ",";
  os << ")";
  return os.str();
}
}  // namespace detail

// Validates the arguments of a pooling op and builds its geometry. `sizes` is the full input shape
// (N, C, *spatial). Errors name the op, the argument, the value and the rule.
inline PoolGeometry make_geometry(const char* op, c10::IntArrayRef sizes, c10::IntArrayRef kernel,
                                  c10::IntArrayRef stride, c10::IntArrayRef pad_before,
                                  c10::IntArrayRef pad_after, c10::IntArrayRef dilation,
                                  bool ceil_mode) {
  using detail::fmt;
  const int64_t nd = static_cast<int64_t>(sizes.size()) - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3, op, ": expected an input with 1 to 3 spatial dims (N, C, *spatial), got shape ",
              fmt(sizes));
  auto check_len = [&](const char* name, c10::IntArrayRef v) {
    TORCH_CHECK(static_cast<int64_t>(v.size()) == nd, op, ": ", name, " must have ", nd,
                " values for a ", nd, "d pool, got ", fmt(v));
  };
  check_len("kernel_size", kernel);
  check_len("stride", stride);
  check_len("padding", pad_before);
  check_len("padding", pad_after);
  check_len("dilation", dilation);
  for (int64_t d = 0; d < nd; ++d) {
    TORCH_CHECK(kernel[d] > 0, op, ": kernel_size must be positive, got ", fmt(kernel));
    TORCH_CHECK(stride[d] > 0, op, ": stride must be positive, got ", fmt(stride));
    TORCH_CHECK(dilation[d] > 0, op, ": dilation must be positive, got ", fmt(dilation));
    TORCH_CHECK(pad_before[d] >= 0 && pad_after[d] >= 0, op, ": padding must be non-negative, got ",
                fmt(pad_before), " before and ", fmt(pad_after), " after");
    TORCH_CHECK(pad_before[d] <= kernel[d] / 2 && pad_after[d] <= kernel[d] / 2, op, ": padding ",
                fmt(pad_before), " must be at most half of kernel_size ", fmt(kernel));
  }
  for (int64_t d = 1; d < static_cast<int64_t>(sizes.size()); ++d) {
    TORCH_CHECK(sizes[d] > 0, op, ": input of shape ", fmt(sizes),
                " has a zero-size dim; only the batch dim may be 0");
  }
  PoolGeometry g{};
  g.ndim = static_cast<int>(nd);
  const int64_t off = kDims - nd;
  for (int d = 0; d < kDims; ++d) {
    g.in[d] = 1; g.out[d] = 1; g.kernel[d] = 1; g.stride[d] = 1;
    g.pad[d] = 0; g.pad_after[d] = 0; g.dilation[d] = 1;
  }
  std::vector<int64_t> outs;
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t t = off + d;
    g.in[t] = sizes[2 + d];
    g.kernel[t] = kernel[d];
    g.stride[t] = stride[d];
    g.pad[t] = pad_before[d];
    g.pad_after[t] = pad_after[d];
    g.dilation[t] = dilation[d];
    g.out[t] = pool_output_size(g.in[t], kernel[d], stride[d], pad_before[d], pad_after[d],
                                dilation[d], ceil_mode);
    outs.push_back(g.out[t]);
  }
  bool dilated = false;
  for (int64_t d = 0; d < nd; ++d) dilated = dilated || dilation[d] != 1;
  for (int64_t d = 0; d < nd; ++d) {
    TORCH_CHECK(outs[d] >= 1, op, ": input of shape ", fmt(sizes), " is too small for kernel_size ",
                fmt(kernel), " with padding ", fmt(pad_before),
                dilated ? " and dilation " + fmt(dilation) : std::string(), ": output would be ",
                fmt(outs));
  }
  return g;
}

// Cells of a plane of an (N, C, ...) tensor of these sizes: the product of the spatial sizes.
inline int64_t plane_cells(c10::IntArrayRef sizes) {
  int64_t p = 1;
  for (size_t d = 2; d < sizes.size(); ++d) p *= sizes[d];
  return p;
}

// Full output shape (N, C, *out) of a geometry.
inline std::vector<int64_t> output_shape(const PoolGeometry& g, c10::IntArrayRef sizes) {
  std::vector<int64_t> shape{sizes[0], sizes[1]};
  for (int d = kDims - g.ndim; d < kDims; ++d) shape.push_back(g.out[d]);
  return shape;
}

}  // namespace torchpool
