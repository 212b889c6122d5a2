// The portable build of the CPU kernels (the compiler's baseline instruction set).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dispatch.h"

#define TORCHPOOL_CPU_NS torchpool::cpu::base_isa
#include "cpu/kernels.h"
#include "cpu/kernels_table.h"

namespace torchpool::cpu {

const Kernels& kernels_base() { return base_isa::table("base"); }

const Kernels& kernels() {
  static const Kernels& chosen = [&]() -> const Kernels& {
    // The tuning first, on the calling thread: a bad TORCHPOOL_CPU_TUNE fails the op call here,
    // never inside a kernel's parallel region.
    tuning();
    const char* force = std::getenv("TORCHPOOL_CPU_ISA");
    const bool base_only = force && std::strcmp(force, "base") == 0;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (!base_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return kernels_avx2();
    }
#endif
    (void)base_only;
    return kernels_base();
  }();
  return chosen;
}

const Tuning& tuning() {
  static const Tuning intel{"intel", true, true}, amd{"amd", false, false};
  static const Tuning& chosen = [&]() -> const Tuning& {
    const char* force = std::getenv("TORCHPOOL_CPU_TUNE");
    if (force && std::strcmp(force, "intel") == 0) return intel;
    if (force && std::strcmp(force, "amd") == 0) return amd;
    TORCH_CHECK(!force || !*force, "TORCHPOOL_CPU_TUNE=", force,
                ": must be intel or amd (or unset, to follow the CPU's vendor)");
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_is("amd")) return amd;
#endif
    return intel;
  }();
  return chosen;
}

}  // namespace torchpool::cpu
