// Helpers shared by the CUDA pooling kernels: launch sizes, index-type and vector-width choice,
// vector loads/stores, correctly rounded division; the device hooks of the op wrappers.
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

#include <atomic>
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

// Multiprocessors of a device (queried once per device).
inline int sm_count(c10::DeviceIndex device) {
  static std::atomic<int> cache[256];  // zero-initialized: not queried yet
  const bool cached = device >= 0 && device < 256;
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = count > 0 ? count : 1;
  if (cached) cache[device].store(count, std::memory_order_relaxed);
  return count;
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

// Lanes per thread in the pooling kernels on contiguous tensors: a thread handles the same cell
// of this many consecutive (n, c) planes, so its window geometry is computed once for all of them
// and their loads are independent.
constexpr int kPlaneLanes = 4;

// Calls f.template run<CL, LANES>() for the layout: contiguous tensors use kPlaneLanes planes per
// thread; channels-last tensors use `vec` consecutive channels (one vector) per thread, only for
// 32-bit indexing (the 64-bit path is for rare, huge tensors and stays scalar).
template <typename scalar_t, typename index_t, typename F>
void dispatch_layout(bool cl, int vec, const F& f) {
  if (!cl) return f.template run<false, kPlaneLanes>();
  if constexpr (std::is_same_v<index_t, int32_t>) {
    constexpr int kVec = max_vec<scalar_t>();
    if (vec == kVec) return f.template run<true, kVec>();
  }
  f.template run<true, 1>();
}

// Work split of the pooling kernels. x runs over `inner` items: the spatial cells of one
// (n, c) plane for contiguous tensors, (cell, channel group) pairs for channels-last ones.
// y runs over `outer` items: groups of LANES planes (contiguous) or batch entries (channels-last).
// A thread derives its cell's window geometry once, then loops over y.
template <typename index_t>
struct Work {
  int64_t inner, outer;
  index_t C;       // channels
  index_t groups;  // channel groups per cell (channels-last), C / LANES
  index_t planes;  // N * C: bounds the last group of planes (contiguous)
};

template <typename index_t>
Work<index_t> make_work(bool cl, int lanes, int64_t N, int64_t C, int64_t plane) {
  Work<index_t> w;
  w.C = static_cast<index_t>(C);
  w.groups = static_cast<index_t>(cl ? C / lanes : 1);
  w.planes = static_cast<index_t>(N * C);
  w.inner = cl ? plane * (C / lanes) : plane;
  w.outer = cl ? N : (N * C + lanes - 1) / lanes;
  return w;
}

// Block and grid for a Work: blocks of kThreads threads, x as wide as the inner items allow (up
// to a full block), y filling the rest; enough blocks for a few waves on the GPU, each thread
// looping over the remaining outer items.
struct Launch {
  dim3 grid, block;
};

inline Launch launch_for(int64_t inner, int64_t outer, c10::DeviceIndex device) {
  int bx = 1;
  while (bx < inner && bx < kThreads) bx *= 2;
  const int by = kThreads / bx;
  const int64_t gx = (inner + bx - 1) / bx;
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "torchpool: ", inner,
              " work items exceed the CUDA grid limit");
  const int64_t target = 32 * static_cast<int64_t>(sm_count(device));
  int64_t gy = std::max<int64_t>(1, (target + gx - 1) / gx);
  gy = std::min<int64_t>(gy, (outer + by - 1) / by);
  gy = std::max<int64_t>(1, std::min<int64_t>(gy, 65535));
  return {dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy)),
          dim3(static_cast<unsigned int>(bx), static_cast<unsigned int>(by))};
}

// Spatial cell index s of a (D, H, W) plane -> (d, h, w).
template <typename index_t>
__device__ __forceinline__ void split_cell(index_t s, index_t H, index_t W, index_t& d, index_t& h,
                                           index_t& w) {
  const index_t q = s / W;
  w = s - q * W;
  d = q / H;
  h = q - d * H;
}

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

// The device part of every CUDA Backend of ops.h: a guard for the op's device and the checks
// the CUDA kernels need on top of the shared ones.
struct Hooks {
  using Guard = c10::cuda::CUDAGuard;

  // The first tensor's device must hold every other tensor.
  static void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                                const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                ref_name, " is on ", ref.device());
  }

  // The max pool kernels number the cells of a window with 32-bit ints.
  static void check_window(const char* op, const PoolGeometry& g) {
    TORCH_CHECK(g.window_cells() <= std::numeric_limits<int32_t>::max(), op, ": a window of ",
                g.window_cells(), " cells is too large");
  }
};

}  // namespace torchpool::cuda
