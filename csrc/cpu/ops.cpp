// CPU op registration: the op bodies are in ops.h, the kernels in the table of dispatch.h.
#include <torch/library.h>

#include "cpu/dispatch.h"
#include "ops.h"

namespace torchpool::cpu {
namespace {

using at::Tensor;

// Forwards to the kernel table picked for this CPU; no guard and no extra checks.
struct Backend : ops::DefaultHooks {
  static void max_fwd(const Tensor& in, const Tensor& out, const Tensor* pos, const PoolGeometry& g,
                      bool cl) {
    kernels().max_fwd(in, out, pos, g, cl);
  }
  static void max_bwd(const Tensor& gout, const Tensor& pos, const Tensor& gin,
                      const PoolGeometry& g, bool cl) {
    kernels().max_bwd(gout, pos, gin, g, cl);
  }
  static void max_indices(const Tensor& pos, const Tensor& idx, const PoolGeometry& g, bool cl) {
    kernels().max_indices(pos, idx, g, cl);
  }
  static void avg_fwd(const Tensor& in, const Tensor& out, const PoolGeometry& g, bool cl,
                      bool count_include_pad, int64_t divisor_override) {
    kernels().avg_fwd(in, out, g, cl, count_include_pad, divisor_override);
  }
  static void avg_bwd(const Tensor& gout, const Tensor& gin, const PoolGeometry& g, bool cl,
                      bool count_include_pad, int64_t divisor_override) {
    kernels().avg_bwd(gout, gin, g, cl, count_include_pad, divisor_override);
  }
  static void global_max_fwd(const Tensor& in, const Tensor& out, const Tensor* pos, bool cl) {
    kernels().global_max_fwd(in, out, pos, cl);
  }
  static void global_avg_fwd(const Tensor& in, const Tensor& out, bool cl) {
    kernels().global_avg_fwd(in, out, cl);
  }
  static void global_bwd(const Tensor& gout, const Tensor* pos, const Tensor& gin, bool cl) {
    kernels().global_bwd(gout, pos, gin, cl);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CPU, m) {
  ops::register_max_pool_ops<Backend>(m);
  ops::register_avg_pool_ops<Backend>(m);
  ops::register_global_pool_ops<Backend>(m);
}

}  // namespace torchpool::cpu
