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
#include "positions.h"

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

// Calls f.template operator()<index_t>() with the index type needs_int64 picks for `numels`.
template <typename F>
void dispatch_index(std::initializer_list<int64_t> numels, const F& f) {
  if (needs_int64(numels)) {
    f.template operator()<int64_t>();
  } else {
    f.template operator()<int32_t>();
  }
}

// Calls f.template operator()<B>() for a runtime bool.
template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) {
    f.template operator()<true>();
  } else {
    f.template operator()<false>();
  }
}

// Calls f.template operator()<CL, LANES>() for the layout: contiguous tensors use kPlaneLanes
// planes per thread; channels-last tensors use `vec` consecutive channels (one vector) per thread,
// only for 32-bit indexing (the 64-bit path is for rare, huge tensors and stays scalar).
template <typename scalar_t, typename index_t, typename F>
void dispatch_layout(bool cl, int vec, const F& f) {
  if (!cl) return f.template operator()<false, kPlaneLanes>();
  if constexpr (std::is_same_v<index_t, int32_t>) {
    constexpr int kVec = max_vec<scalar_t>();
    if (vec == kVec) return f.template operator()<true, kVec>();
  }
  f.template operator()<true, 1>();
}

// Launches a pooling kernel with the Work split over `plane` cells of each (n, c) plane of `ref`
// (N, C, *spatial): 64-bit indexing when any of `numels` needs it, else 32-bit with channels-last
// vectors when C and `ptrs` allow them (channel_vec); then the layout and lanes (dispatch_layout).
// `launch` is called as launch.template operator()<index_t, CL, LANES>(work, launch, stream) and
// launches the kernel; the launch is checked here.
template <typename scalar_t, typename F>
void launch_pool(const at::Tensor& ref, bool cl, int64_t plane,
                 std::initializer_list<int64_t> numels,
                 std::initializer_list<std::pair<const void*, size_t>> ptrs, const F& launch) {
  const int64_t N = ref.size(0), C = ref.size(1);
  const c10::DeviceIndex device = ref.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_index(numels, [&]<typename index_t>() {
    const int vec =
        std::is_same_v<index_t, int32_t> && cl ? channel_vec<scalar_t>(C, ptrs) : 1;
    dispatch_layout<scalar_t, index_t>(cl, vec, [&]<bool CL, int LANES>() {
      const auto w = make_work<index_t>(CL, LANES, N, C, plane);
      const Launch l = launch_for(w.inner, w.outer, device);
      launch.template operator()<index_t, CL, LANES>(w, l, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Calls f.template operator()<index_t, CL>() for a one-thread-per-element kernel: 64-bit indexing
// when any of `numels` needs it.
template <typename F>
void dispatch_flat(std::initializer_list<int64_t> numels, bool cl, const F& f) {
  dispatch_index(numels, [&]<typename index_t>() {
    dispatch_bool(cl, [&]<bool CL>() { f.template operator()<index_t, CL>(); });
  });
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

// A spatial cell's coordinates (d, h, w) and, per dim, a range [lo, hi): for an output cell, of
// its window cells inside the input (PoolGeometry::valid_cells); for an input cell, of the
// outputs whose window can contain it (PoolGeometry::covering_outputs).
template <typename index_t>
struct CellRanges {
  index_t d, h, w;
  int64_t lo[3], hi[3];
};

template <typename index_t>
__device__ __forceinline__ CellRanges<index_t> output_cell_window(const PoolGeometry& g,
                                                                  index_t s) {
  CellRanges<index_t> r;
  split_cell<index_t>(s, g.out[1], g.out[2], r.d, r.h, r.w);
  g.valid_cells(0, r.d, r.lo[0], r.hi[0]);
  g.valid_cells(1, r.h, r.lo[1], r.hi[1]);
  g.valid_cells(2, r.w, r.lo[2], r.hi[2]);
  return r;
}

template <typename index_t>
__device__ __forceinline__ CellRanges<index_t> input_cell_outputs(const PoolGeometry& g,
                                                                  index_t s) {
  CellRanges<index_t> r;
  split_cell<index_t>(s, g.in[1], g.in[2], r.d, r.h, r.w);
  g.covering_outputs(0, r.d, r.lo[0], r.hi[0]);
  g.covering_outputs(1, r.h, r.lo[1], r.hi[1]);
  g.covering_outputs(2, r.w, r.lo[2], r.hi[2]);
  return r;
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

// A pooling kernel thread's share of a Work: its spatial cell s (output cell in a forward, input
// cell in a backward) and first channel c, and the layout's offsets.
template <typename index_t, bool CL, int LANES>
struct PoolThread {
  index_t s, c;
  index_t in_plane, out_plane;  // spatial cells of an input / output plane
  index_t step;                 // elements between neighbouring cells
  index_t in_outer, out_outer;  // elements between consecutive outer items (input / output)

  // Offset of this thread's first element in outer item 0 of a tensor whose plane holds s.
  __device__ __forceinline__ index_t cell() const { return CL ? s * step + c : s; }
};

// Sets up this thread's PoolThread; false when the thread has no inner item.
template <typename index_t, bool CL, int LANES>
__device__ __forceinline__ bool pool_thread(const Work<index_t>& w, const PoolGeometry& g,
                                            PoolThread<index_t, CL, LANES>& t) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= w.inner) return false;
  t.s = static_cast<index_t>(x);
  t.c = 0;
  if constexpr (CL) {
    t.s = static_cast<index_t>(x) / w.groups;
    t.c = (static_cast<index_t>(x) - t.s * w.groups) * LANES;
  }
  t.in_plane = static_cast<index_t>(g.in_plane());
  t.out_plane = static_cast<index_t>(g.out_plane());
  t.step = CL ? w.C : 1;
  t.in_outer = CL ? t.in_plane * w.C : t.in_plane * LANES;
  t.out_outer = CL ? t.out_plane * w.C : t.out_plane * LANES;
  return true;
}

// Calls f(yi, lanes) for each of this thread's outer items yi; `lanes` is LANES except for the
// last, partial group of planes of a contiguous tensor.
template <typename index_t, bool CL, int LANES, typename F>
__device__ __forceinline__ void for_each_outer(const Work<index_t>& w, const F& f) {
  for (int64_t y = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; y < w.outer;
       y += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const index_t yi = static_cast<index_t>(y);
    const int lanes =
        CL ? LANES : static_cast<int>(std::min<index_t>(LANES, w.planes - yi * LANES));
    f(yi, lanes);
  }
}

// The LANES values of a cell at p: one vector (channels-last) or the first `lanes` of LANES planes
// `plane` elements apart (contiguous; the others read as 0).
template <bool CL, int LANES, typename T, typename index_t>
__device__ __forceinline__ void load_lanes(const T* __restrict__ p, index_t plane, int lanes,
                                           T (&v)[LANES]) {
  if constexpr (CL) {
    load_vec<LANES>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < LANES; ++j) v[j] = j < lanes ? p[j * plane] : T(0);
  }
}

// Stores the LANES values v, converted to T, to the cell at p (layout as in load_lanes; only the
// first `lanes` on a contiguous tensor).
template <bool CL, int LANES, typename T, typename index_t, typename V>
__device__ __forceinline__ void store_lanes(T* __restrict__ p, index_t plane, int lanes,
                                            const V (&v)[LANES]) {
  T r[LANES];
#pragma unroll
  for (int j = 0; j < LANES; ++j) r[j] = static_cast<T>(v[j]);
  if constexpr (CL) {
    store_vec<LANES>(p, r);
  } else {
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
      if (j < lanes) p[j * plane] = r[j];
    }
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

  // The global max kernels write each maximum's cell as int64, whatever the plane's size.
  static at::ScalarType global_position_dtype(int64_t) { return at::kLong; }

  // The saved positions given to the max backwards, checked by ATen ops on the device
  // (positions.h): a few elementwise kernels and a read back, which waits for the device. The
  // autograd's backward passes check_pos=False and skips them.
  static void check_global_positions(const char* op, const at::Tensor& pos, int64_t cells) {
    refuse_global_position(op, misplaced_global_position(pos, cells), cells);
  }
  static void check_max_positions(const char* op, const at::Tensor& pos, const PoolGeometry& g,
                                  bool cl) {
    refuse_window_position(op, misplaced_window_position(pos, g, cl), g, pos.size(1), cl);
  }

  // The max pool kernels number the cells of a window with 32-bit ints.
  static void check_window(const char* op, const PoolGeometry& g) {
    TORCH_CHECK(g.window_cells() <= std::numeric_limits<int32_t>::max(), op, ": a window of ",
                g.window_cells(), " cells is too large");
  }

  // Outputs come from torch's CUDA caching allocator.
  static at::Tensor empty(c10::IntArrayRef shape, const at::TensorOptions& options) {
    return at::empty(shape, options);
  }
};

}  // namespace torchpool::cuda
