// CPU op registration: the op bodies are in ops.h, the kernels in the table of dispatch.h.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/output_cache.h"
#include "ops.h"

namespace torchpool::cpu {
namespace {

// Forwards each kernel call to the table picked for this CPU (signatures in dispatch.h); no
// guard and no extra checks.
struct Backend : ops::DefaultHooks {
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

// The instruction set and the tuning of the kernels picked for this CPU.
std::vector<std::string> cpu_kernels() { return {kernels().isa, tuning().name}; }

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
