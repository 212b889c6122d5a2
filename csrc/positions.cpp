// The device-independent position checks and their errors (positions.h), and the private ops
// that run those checks on any device.
#include "positions.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ops.h"

namespace torchpool {
namespace {

// "[n, c, d, h, w]", the logical index of flat element e (memory order) of a max pool's
// positions (the spatial dims the user gave).
std::string position_index(int64_t e, const PoolGeometry& g, int64_t C, bool cl) {
  const int64_t OP = g.out_plane();
  const int64_t plane = cl ? e / (OP * C) * C + e % C : e / OP;
  const int64_t s = cl ? (e / C) % OP : e % OP;
  const int64_t at[] = {plane / C, plane % C, s / (g.out[1] * g.out[2]), (s / g.out[2]) % g.out[1],
                        s % g.out[2]};
  std::string out = "[";
  for (int i = 0; i < 5; ++i) {
    if (i >= 2 && i < 2 + kDims - g.ndim) continue;
    out += (out.size() > 1 ? ", " : "") + std::to_string(at[i]);
  }
  return out + "]";
}

// "(a, b)": the last g.ndim of three values.
std::string spatial(const int64_t (&v)[kDims], const PoolGeometry& g) {
  return detail::fmt({v + kDims - g.ndim, static_cast<size_t>(g.ndim)});
}

// Positions checked per round of ATen ops (each round makes a few int32 tensors of this many).
constexpr int64_t kRound = int64_t{1} << 22;

// v as a tensor on `device` shaped to broadcast along dim 1 + d of (rows, OD, OH, OW, group).
at::Tensor along_dim(const std::vector<int64_t>& v, int d, at::ScalarType dtype,
                     at::Device device) {
  std::vector<int64_t> shape(5, 1);
  shape[1 + d] = static_cast<int64_t>(v.size());
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device, dtype).view(shape);
}

}  // namespace

MisplacedPosition misplaced_window_position(const at::Tensor& pos, const PoolGeometry& g,
                                            bool cl) {
  const int64_t M = pos.numel();
  if (M == 0) return {};
  const int64_t N = pos.size(0), C = pos.size(1), cells = g.window_cells();
  // The positions in memory order as (rows, OD, OH, OW, group): N * C planes of one position per
  // output, or N images of C.
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < pos.dim(); ++d) order.push_back(d);
  order.push_back(1);
  const at::Tensor p = cl ? pos.permute(order).reshape({N, g.out[0], g.out[1], g.out[2], C})
                          : pos.reshape({N * C, g.out[0], g.out[1], g.out[2], 1});
  // Per dim and output, the window cells inside the input [lo, hi), and whether there are none.
  at::Tensor lo[kDims], hi[kDims], missed;
  for (int d = 0; d < kDims; ++d) {
    std::vector<int64_t> l(g.out[d]), h(g.out[d]), none(g.out[d]);
    for (int64_t o = 0; o < g.out[d]; ++o) {
      g.valid_cells(d, o, l[o], h[o]);
      none[o] = l[o] == h[o];
    }
    lo[d] = along_dim(l, d, at::kInt, pos.device());
    hi[d] = along_dim(h, d, at::kInt, pos.device());
    const at::Tensor m = along_dim(none, d, at::kBool, pos.device());
    missed = d == 0 ? m : missed.logical_or(m);
  }
  const int64_t per_row = M / p.size(0), rows = std::max<int64_t>(1, kRound / per_row);
  std::vector<at::Tensor> first_outside, first_padded;
  for (int64_t r0 = 0; r0 < p.size(0); r0 += rows) {
    const int64_t nr = std::min(rows, p.size(0) - r0);
    // int32 whatever the positions' dtype: comparisons with a scalar keep a uint8 tensor's dtype.
    const at::Tensor q = p.narrow(0, r0, nr).to(at::kInt);
    const at::Tensor index =
        at::arange(r0 * per_row, (r0 + nr) * per_row, pos.options().dtype(at::kLong))
            .view(q.sizes());
    const at::Tensor outside = q.lt(0).logical_or_(q.ge(cells));
    const at::Tensor k = q.clamp(0, cells - 1);
    const at::Tensor kw = k.remainder(g.kernel[2]), kdh = k.div(g.kernel[2], "trunc");
    const at::Tensor kh = kdh.remainder(g.kernel[1]), kd = kdh.div(g.kernel[1], "trunc");
    const at::Tensor inside = kd.ge(lo[0])
                                  .logical_and_(kd.lt(hi[0]))
                                  .logical_and_(kh.ge(lo[1]))
                                  .logical_and_(kh.lt(hi[1]))
                                  .logical_and_(kw.ge(lo[2]))
                                  .logical_and_(kw.lt(hi[2]))
                                  .logical_or_(missed);
    first_outside.push_back(at::where(outside, index, M).min());
    first_padded.push_back(at::where(inside, M, index).min());
  }
  // One read back for both.
  const at::Tensor firsts =
      at::stack({at::stack(first_outside).min(), at::stack(first_padded).min()}).cpu();
  const int64_t* f = firsts.const_data_ptr<int64_t>();
  MisplacedPosition bad;
  if (f[0] < M) {
    bad.index = f[0];
    bad.outside_window = true;
  } else if (f[1] < M) {
    bad.index = f[1];
  } else {
    return {};
  }
  bad.value = p.reshape(-1)[bad.index].item<int64_t>();
  return bad;
}

MisplacedPosition misplaced_global_position(const at::Tensor& pos, int64_t cells) {
  const int64_t M = pos.numel();
  if (M == 0) return {};
  const at::Tensor p = pos.reshape(-1).to(at::kLong);
  const at::Tensor outside = p.lt(0).logical_or_(p.ge(cells));
  const int64_t at = at::where(outside, at::arange(M, p.options()), M).min().item<int64_t>();
  if (at >= M) return {};
  return {at, p[at].item<int64_t>(), true};
}

void refuse_window_position(const char* op, const MisplacedPosition& bad, const PoolGeometry& g,
                            int64_t C, bool cl) {
  if (bad.index < 0) return;
  const int64_t k = bad.value;
  const std::string where = "pos" + position_index(bad.index, g, C, cl) + " is " + std::to_string(k);
  TORCH_CHECK(!bad.outside_window, op, ": pos must hold window cells in [0, ", g.window_cells(),
              ") (windows of ", g.window_cells(), " cells); ", where);
  const int64_t e = cl ? bad.index / C : bad.index;
  const int64_t s = e % g.out_plane();
  const int64_t o[kDims] = {s / (g.out[1] * g.out[2]), (s / g.out[2]) % g.out[1], s % g.out[2]};
  const int64_t cell[kDims] = {k / (g.kernel[1] * g.kernel[2]), (k / g.kernel[2]) % g.kernel[1],
                               k % g.kernel[2]};
  int64_t in[kDims];
  for (int d = 0; d < kDims; ++d) in[d] = g.input_coord(d, o[d], cell[d]);
  TORCH_CHECK(false, op, ": pos must name window cells inside the input, not in its padding; ",
              where, ", window cell ", spatial(cell, g), ", which lies at ", spatial(in, g),
              " of an input of size ", spatial(g.in, g));
}

void refuse_global_position(const char* op, const MisplacedPosition& bad, int64_t cells) {
  TORCH_CHECK(bad.index < 0, op, ": pos must hold cells in [0, ", cells, ") (planes of ", cells,
              " cells), got ", bad.value, " at flat index ", bad.index);
}

namespace {

// The checks that max_pool_backward, max_pool_indices and global_max_pool_backward make on a
// device other than the CPU, on any device (the CPU's own ops check in one pass of their own).
void check_max_positions(const at::Tensor& pos, c10::IntArrayRef input_size,
                         c10::IntArrayRef kernel, c10::IntArrayRef stride,
                         c10::IntArrayRef pad_before, c10::IntArrayRef pad_after,
                         c10::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "_check_max_positions";
  const PoolGeometry g =
      make_geometry(op, input_size, kernel, stride, pad_before, pad_after, dilation, ceil_mode);
  const auto fmt = layout_of(pos);
  const at::Tensor p = ops::checked_pos(op, pos, g, input_size, fmt);
  const bool cl = is_channels_last(fmt);
  refuse_window_position(op, misplaced_window_position(p, g, cl), g, p.size(1), cl);
}

void check_global_positions(const at::Tensor& pos, c10::IntArrayRef input_size) {
  const char* op = "_check_global_positions";
  check_global_input(op, input_size);
  const int64_t cells = plane_cells(input_size);
  // Any integer dtype: the CPU saves the plane's narrowest, CUDA int64.
  const at::Tensor p = ops::checked_global_pos(op, pos, input_size, std::nullopt);
  refuse_global_position(op, misplaced_global_position(p, cells), cells);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CompositeExplicitAutograd, m) {
  m.impl("_check_max_positions", &check_max_positions);
  m.impl("_check_global_positions", &check_global_positions);
}

}  // namespace torchpool
