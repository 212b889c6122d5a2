// CPU op registration: the op bodies are in ops.h, the kernels in the table of dispatch.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/output_cache.h"
#include "ops.h"

namespace torchpool::cpu {
namespace {

// The first of n saved cells outside [0, cells), or -1: one pass for the bounds, a second only
// where one is outside.
template <typename T>
int64_t first_cell_outside(const T* p, int64_t n, int64_t cells) {
  T lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  if (lo >= 0 && static_cast<int64_t>(hi) < cells) return -1;
  int64_t i = 0;
  while (p[i] >= 0 && static_cast<int64_t>(p[i]) < cells) ++i;
  return i;
}

// Forwards each kernel call to the table picked for this CPU (signatures in dispatch.h); no
// guard. The one check of its own: the global max backward writes each gradient at its saved
// cell, so cells given to the op that lie outside their planes are refused, not written out of
// bounds (one pass over N * C positions, next to the N * C * cells values the backward writes).
struct Backend : ops::DefaultHooks {
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
