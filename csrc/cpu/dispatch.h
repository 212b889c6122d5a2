// Table of CPU kernels, one per instruction set, picked once at run time for the CPU we run on.
#pragma once

#include <ATen/core/Tensor.h>

#include "geometry.h"

namespace torchpool::cpu {

// All tensors are dense in the layout given by `cl` (channels-last or contiguous); `pos` may be
// null for the variants that write no position.
struct Kernels {
  const char* isa;
  void (*max_fwd)(const at::Tensor& in, const at::Tensor& out, const at::Tensor* pos,
                  const PoolGeometry& g, bool cl);
  void (*max_bwd)(const at::Tensor& gout, const at::Tensor& pos, const at::Tensor& gin,
                  const PoolGeometry& g, bool cl);
  void (*max_indices)(const at::Tensor& pos, const at::Tensor& idx, const PoolGeometry& g, bool cl);
  void (*avg_fwd)(const at::Tensor& in, const at::Tensor& out, const PoolGeometry& g, bool cl,
                  bool count_include_pad, int64_t divisor_override);
  void (*avg_bwd)(const at::Tensor& gout, const at::Tensor& gin, const PoolGeometry& g, bool cl,
                  bool count_include_pad, int64_t divisor_override);
  void (*global_max_fwd)(const at::Tensor& in, const at::Tensor& out, const at::Tensor* pos, bool cl);
  void (*global_avg_fwd)(const at::Tensor& in, const at::Tensor& out, bool cl);
  // pos null: average backward.
  void (*global_bwd)(const at::Tensor& gout, const at::Tensor* pos, const at::Tensor& gin, bool cl);
};

const Kernels& kernels_base();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels& kernels_avx2();
#endif

// The fastest table this CPU supports (TORCHPOOL_CPU_ISA=base forces the portable one).
const Kernels& kernels();

// Choices of the AVX2 kernels where what is fastest differs between CPUs (NOTES §70, §84), made
// once from the CPU's vendor; TORCHPOOL_CPU_TUNE=intel or amd forces one set.
struct Tuning {
  const char* name;
  // The float32 global reductions of NCHW planes (sums, maxima, and the one-pass argmax of the
  // global max training forward) prefetch 2 KiB ahead (Intel: faster from memory; AMD: level or
  // slower, the hardware prefetchers keep up; the argmax of short planes 10-20 % slower, §90).
  bool float_reductions_prefetch;
  // The global max with positions over short float32 planes finds eight planes' maxima first and
  // then each maximum's cell (Intel), or, for every type, eight planes' maxima and cells in one
  // pass over each plane (AMD, NOTES §97).
  bool argmax_after_max;
  // Where the CPU has AVX-512 (avx512_parts), the global max with positions over planes of 16 to
  // 255 cells takes §97's one pass, in AVX-512, instead of the above (Intel: masked moves where
  // AVX2 blends; faster than the two passes, NOTES §115, and for the half types than the AVX2
  // scan of each plane, §117; AMD: not measured, off).
  bool argmax_avx512;
  // The channels-last max training forward keeps each maximum's position by a variable blend
  // (AMD: one instruction, §96) or by and + integer max (Intel, where the blend is two or three).
  bool positions_by_blend;
  // The half types' global max backward over planes too long to stage zeroes a large result by
  // non-temporal stores (Intel: memset wrote lines not in the cache at 15 GB/s, §114), or by one
  // memset (AMD: not measured, left as it was).
  bool half_max_zeros_stream;
  // The 3 x 3 stride-1 average forward over small planes read as flat runs (avg_planes_flat3)
  // prefetches the next plane as it starts each one, and takes the half types too (Intel: float
  // 15 % faster from memory, where the hardware prefetchers left its reads waiting; the half
  // types, widened into a buffer first, were slower from memory than box_rows_rolling without
  // it; NOTES §121). AMD: off, its float forward read at the read ceiling without it (not
  // measured there).
  bool flat_avg_prefetch;
};
const Tuning& tuning();

// Whether the AVX2 kernels may call their AVX-512 parts: the CPU (and its OS) has AVX-512F and
// TORCHPOOL_CPU_ISA is unset. Call it outside parallel regions.
bool avx512_parts();

}  // namespace torchpool::cpu
