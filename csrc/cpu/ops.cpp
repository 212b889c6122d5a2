// CPU op registration: the op bodies are in ops.h, the kernels in the table of dispatch.h.
#include <torch/library.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/dispatch.h"
#include "ops.h"

namespace torchpool::cpu {
namespace {

// Large outputs are usually fresh pages from mmap, and on a VM faulting them in 4 KiB at a time
// costs more than the kernel that writes them (a fresh 51 MB gradient: ~12 ms of faults against
// ~1.3 ms to zero it once mapped). Where the kernel allows it, ask for transparent huge pages on
// the 2 MiB-aligned interior before the first write; already-mapped memory is unaffected.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last >= first + 2 * kHuge) {
    // Advice only: on failure (THP disabled, old kernel) the pages stay small.
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

// Forwards each kernel call to the table picked for this CPU (signatures in dispatch.h); no
// guard and no extra checks.
struct Backend : ops::DefaultHooks {
  static void advise_fresh(const at::Tensor& t) { advise_huge_pages(t); }
  template <typename... A> static void max_fwd(const A&... a) { kernels().max_fwd(a...); }
  template <typename... A> static void max_bwd(const A&... a) { kernels().max_bwd(a...); }
  template <typename... A> static void max_indices(const A&... a) { kernels().max_indices(a...); }
  template <typename... A> static void avg_fwd(const A&... a) { kernels().avg_fwd(a...); }
  template <typename... A> static void avg_bwd(const A&... a) { kernels().avg_bwd(a...); }
  template <typename... A> static void global_max_fwd(const A&... a) { kernels().global_max_fwd(a...); }
  template <typename... A> static void global_avg_fwd(const A&... a) { kernels().global_avg_fwd(a...); }
  template <typename... A> static void global_bwd(const A&... a) { kernels().global_bwd(a...); }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CPU, m) {
  ops::register_max_pool_ops<Backend>(m);
  ops::register_avg_pool_ops<Backend>(m);
  ops::register_global_pool_ops<Backend>(m);
}

}  // namespace torchpool::cpu
