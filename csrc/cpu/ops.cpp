// CPU op registration: the op bodies are in ops.h, the kernels in the table of dispatch.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/output_cache.h"
#include "cpu/position_check.h"
#include "ops.h"

namespace torchpool::cpu {
namespace {

// "[n, c, d, h, w]", the logical index of flat element e of a max pool's positions (the spatial
// dims the user gave).
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

// Forwards each kernel call to the table picked for this CPU (signatures in dispatch.h); no
// guard. Its own checks are of the saved positions given to the max backwards, which the
// forwards would not have written (position_check.h):
//   * the global max backward writes each gradient at its saved cell, so cells outside their
//     planes are refused, not written out of bounds (one pass over N * C positions, next to the
//     N * C * cells values the backward writes);
//   * the window max backward (and max_pool_indices) refuses a position outside its window or on
//     a window cell in the padding (one pass over the positions, then one over those of the
//     border windows).
struct Backend : ops::DefaultHooks {
  static void check_max_positions(const char* op, const at::Tensor& pos, const PoolGeometry& g,
                                  bool cl) {
    const int64_t N = pos.size(0), C = pos.size(1);
    AT_DISPATCH_INTEGRAL_TYPES(pos.scalar_type(), "check_max_positions", [&] {
      const scalar_t* p = pos.const_data_ptr<scalar_t>();
      const auto bad =
          cl ? find_misplaced_position(p, g, N, C) : find_misplaced_position(p, g, N * C, 1);
      if (bad.index < 0) return;
      const int64_t k = static_cast<int64_t>(p[bad.index]);
      const std::string where =
          "pos" + position_index(bad.index, g, C, cl) + " is " + std::to_string(k);
      TORCH_CHECK(!bad.outside_window, op, ": pos must hold window cells in [0, ",
                  g.window_cells(), ") (windows of ", g.window_cells(), " cells); ", where);
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
    });
  }

  static void check_global_positions(const char* op, const at::Tensor& pos, int64_t cells) {
    AT_DISPATCH_INTEGRAL_TYPES(pos.scalar_type(), "check_global_positions", [&] {
      const scalar_t* p = pos.const_data_ptr<scalar_t>();
      const int64_t at = first_cell_outside(p, pos.numel(), cells);
      TORCH_CHECK(at < 0, op, ": pos must hold cells in [0, ", cells, ") (planes of ", cells,
                  " cells), got ", static_cast<int64_t>(p[at < 0 ? 0 : at]), " at flat index ",
                  at);
    });
  }
  static at::Tensor empty(c10::IntArrayRef shape, const at::TensorOptions& options) {
    return empty_output(shape, options);
  }
  template <typename... A> static void max_fwd(const A&... a) { kernels().max_fwd(a...); }
  template <typename... A> static void max_bwd(const A&... a) { kernels().max_bwd(a...); }
  template <typename... A> static void max_indices(const A&... a) { kernels().max_indices(a...); }
  template <typename... A> static void avg_fwd(const A&... a) { kernels().avg_fwd(a...); }
  template <typename... A> static void avg_bwd(const A&... a) { kernels().avg_bwd(a...); }
  template <typename... A> static void global_max_fwd(const A&... a) { kernels().global_max_fwd(a...); }
  template <typename... A> static void global_avg_fwd(const A&... a) { kernels().global_avg_fwd(a...); }
  template <typename... A> static void global_bwd(const A&... a) { kernels().global_bwd(a...); }
};

// The instruction set and the tuning of the kernels picked for this CPU ("avx2+avx512" where the
// tuning takes the AVX2 table's AVX-512 parts).
std::vector<std::string> cpu_kernels() {
  std::string isa = kernels().isa;
  if (avx512_parts() && tuning().argmax_avx512) isa += "+avx512";
  return {isa, tuning().name};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchpool, m) {
  m.def("cpu_kernels() -> str[]", &cpu_kernels);
  m.def("cpu_cache_stats() -> int[]", &output_cache_stats);
  m.def("empty_cpu_cache() -> int", &output_cache_empty);
}

TORCH_LIBRARY_IMPL(torchpool, CPU, m) {
  ops::register_max_pool_ops<Backend>(m);
  ops::register_avg_pool_ops<Backend>(m);
  ops::register_global_pool_ops<Backend>(m);
}

}  // namespace torchpool::cpu
