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

namespace {
bool avx512_allowed = false;  // set once, by kernels()'s choice
}  // namespace

const Kernels& kernels() {
  static const Kernels& chosen = [&]() -> const Kernels& {
    // The tuning first, on the calling thread: a bad TORCHPOOL_CPU_TUNE fails the op call here,
    // never inside a kernel's parallel region.
    tuning();
    // TORCHPOOL_CPU_ISA: unset or empty for the fastest table this CPU runs (with the AVX2 table's
    // AVX-512 parts where the CPU has AVX-512F), "base" for the portable one, "avx2" to insist on
    // AVX2 without the AVX-512 parts (an error where the CPU or the build lacks AVX2).
    const char* force = std::getenv("TORCHPOOL_CPU_ISA");
    const bool any = !force || !*force;
    const bool base_only = !any && std::strcmp(force, "base") == 0;
    const bool avx2_only = !any && std::strcmp(force, "avx2") == 0;
    TORCH_CHECK(any || base_only || avx2_only, "TORCHPOOL_CPU_ISA=", force,
                ": must be base or avx2 (or unset, for the fastest this CPU runs)");
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!base_only && has_avx2) {
      avx512_allowed = any && __builtin_cpu_supports("avx512f");
      return kernels_avx2();
    }
#else
    const bool has_avx2 = false;
#endif
    TORCH_CHECK(!avx2_only || has_avx2,
                "TORCHPOOL_CPU_ISA=avx2: this CPU (or this build) has no AVX2 and FMA; unset it, "
                "or set it to base");
    return kernels_base();
  }();
  return chosen;
}

bool avx512_parts() {
  kernels();
  return avx512_allowed;
}

const Tuning& tuning() {
  static const Tuning intel{"intel", true, true, true, false, true, true},
      amd{"amd", false, false, false, true, false, false};
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
