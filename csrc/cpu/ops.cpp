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
#include "positions.h"

namespace torchpool::cpu {
namespace {

// Forwards each kernel call to the table picked for this CPU (signatures in dispatch.h); no
// guard. Its own checks are of the saved positions given to the max backwards, which the
// forwards would not have written (found by position_check.h, refused as positions.h does for
// every device):
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
      auto bad = cl ? find_misplaced_position(p, g, N, C) : find_misplaced_position(p, g, N * C, 1);
      if (bad.index >= 0) bad.value = static_cast<int64_t>(p[bad.index]);
      refuse_window_position(op, bad, g, C, cl);
    });
  }

  static void check_global_positions(const char* op, const at::Tensor& pos, int64_t cells) {
    AT_DISPATCH_INTEGRAL_TYPES(pos.scalar_type(), "check_global_positions", [&] {
      const scalar_t* p = pos.const_data_ptr<scalar_t>();
      const int64_t at = first_cell_outside(p, pos.numel(), cells);
      refuse_global_position(op, {at, at < 0 ? 0 : static_cast<int64_t>(p[at]), true}, cells);
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
