// The AVX2 + FMA build of the CPU kernels, chosen at run time when the CPU has them.
// ATen's headers come first, compiled for the baseline; only the kernels below are compiled for
// AVX2, inside their own namespace, so no inline function of a shared header gets AVX2 code.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/dispatch.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The kernels pass AVX vectors only between functions of this unit, all compiled for AVX2: GCC's
// note that a vector return without AVX on the command line changes the ABI does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define TORCHPOOL_CPU_NS torchpool::cpu::avx2_isa
#define TORCHPOOL_AVX2 1
#include "cpu/kernels.h"
#include "cpu/kernels_table.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace torchpool::cpu {
const Kernels& kernels_avx2() { return avx2_isa::table("avx2"); }
}  // namespace torchpool::cpu
#endif
