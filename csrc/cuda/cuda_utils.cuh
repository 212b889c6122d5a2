// Helpers shared by the CUDA pooling kernels: launch sizes, index-type and vector-width choice,
// vector loads/stores, and arithmetic that stays exact under --use_fast_math.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

#include "common.h"

namespace torchpool::cuda {

constexpr int kThreads = 256;

// Blocks of kThreads that cover `items` work items, one per thread.
inline unsigned int blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "torchpool: ", items,
              " work items exceed the CUDA grid limit");
  return static_cast<unsigned int>(blocks);
}

// 32-bit index arithmetic is enough while every tensor involved has fewer than 2^31 elements.
inline bool needs_int64(std::initializer_list<int64_t> numels) {
  for (const int64_t n : numels) {
    if (n >= (int64_t{1} << 31)) return true;
  }
  return false;
}

inline int sm_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int max_vec() {
  return static_cast<int>(16 / sizeof(T));
}

// Channels per thread in channels-last kernels: a full 16-byte vector when C is a multiple of it
// and every pointer is aligned to it, else 1. `ptrs` pairs a base pointer with its element size.
template <typename scalar_t>
int channel_vec(int64_t C, std::initializer_list<std::pair<const void*, size_t>> ptrs) {
  constexpr int vec = max_vec<scalar_t>();
  if (C % vec != 0) return 1;
  for (const auto& p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p.first) % (p.second * vec) != 0) return 1;
  }
  return vec;
}

// Calls f.template run<CL, VEC>() for the layout and vector width. Vector widths are only
// instantiated for 32-bit indexing (the 64-bit path is for rare, huge tensors and stays scalar).
template <typename scalar_t, typename index_t, typename F>
void dispatch_layout(bool cl, int vec, const F& f) {
  if (!cl) return f.template run<false, 1>();
  if constexpr (std::is_same_v<index_t, int32_t>) {
    constexpr int kVec = max_vec<scalar_t>();
    if (vec == kVec) return f.template run<true, kVec>();
  }
  f.template run<true, 1>();
}

// Spatial coordinate of flat index t and the offset of its (n, c, cell 0) element.
// Contiguous: t = ((nc*D + d)*H + h)*W + w. Channels-last: t = (((n*D + d)*H + h)*W + w)*G + cg
// with G = C / VEC channel groups of VEC channels.
template <typename index_t, bool CL, int VEC>
struct Cell {
  index_t d, h, w;
  index_t base;  // offset of element (n, c, 0, 0, 0) in a tensor with `plane` cells per (n, c)
  index_t step;  // distance between neighbouring cells

  __device__ __forceinline__ Cell(index_t t, index_t D, index_t H, index_t W, index_t C,
                                  index_t plane) {
    index_t r;
    if constexpr (CL) {
      const index_t groups = C / VEC;
      r = t / groups;
      const index_t c = (t - r * groups) * VEC;
      const index_t q = r / W;
      w = r - q * W;
      h = q % H;
      const index_t s = q / H;
      d = s % D;
      const index_t n = s / D;
      base = n * plane * C + c;
      step = C;
    } else {
      r = t / W;
      w = t - r * W;
      h = r % H;
      const index_t s = r / H;
      d = s % D;
      const index_t nc = s / D;
      base = nc * plane;
      step = 1;
    }
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = p[0];
  } else {
    const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = v.v[j];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = in[0];
  } else {
    Vec<T, N> v;
#pragma unroll
    for (int j = 0; j < N; ++j) v.v[j] = in[j];
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Correctly rounded division (torch's result), also when compiled with --use_fast_math.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

// The first tensor's device must hold every other tensor.
inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                              const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

}  // namespace torchpool::cuda
