// CUDA global max / average pool ops: (N, C, *spatial) -> (N, C), and their backward.
//
// Forward reduces P = prod(spatial) cells per (n, c):
//   * contiguous input with small P: a group of G <= 32 lanes per (n, c) row, warp shuffles;
//   * otherwise the input is viewed as (N', P, C') (channels-last: (N, P, C); contiguous:
//     (N*C, P, 1)) and a block reduces a tile of channels over a range of cells; when there are
//     too few tiles to fill the GPU, the cells are split over several blocks whose partial
//     results a second kernel combines in split order.
// Every reduction order is fixed by the shape (and the GPU's SM count), so results are
// reproducible. The max keeps the position of the first maximum, or of the last NaN when there
// is one: exactly what a sequential scan with "take v when v > max or v is NaN" returns.
// Backward writes every input cell once (no atomics).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"
#include "ops.h"

namespace torchpool::cuda {
namespace {

using at::Tensor;

constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

// Max with the position of the result. Combining selects the larger state under a total order
// (any NaN above any number, a later NaN above an earlier one; equal numbers: the earlier
// position wins), so any combination order gives the sequential scan's answer. The position is
// tracked without kPos too: the lanes combine strided cells, and only the position tells which
// of -0 and +0 came first (torch keeps the first of equal values). kPos: the position is written.
template <typename acc_t, bool kPos>
struct MaxOp {
  static constexpr bool kTracksPos = true;
  struct State {
    acc_t v;
    int64_t i;
  };
  __device__ __forceinline__ static State identity() { return {neg_inf<acc_t>(), kNoIndex}; }
  __device__ __forceinline__ static void combine(State& a, const State& b) {
    const bool an = at::_isnan(a.v), bn = at::_isnan(b.v);
    const bool take = (an || bn) ? (bn && (!an || b.i > a.i))
                                 : (b.v > a.v || (b.v == a.v && b.i < a.i));
    if (take) a = b;
  }
  // One lane's own scan, cells in increasing order: v is taken when it is the first, larger or
  // NaN (combine's rule for a later cell), without branches.
  __device__ __forceinline__ static void add(State& s, acc_t v, int64_t i) {
    const bool take = s.i == kNoIndex || v > s.v || at::_isnan(v);
    s.v = take ? v : s.v;
    s.i = take ? i : s.i;
  }
  __device__ __forceinline__ static State shfl_down(const State& s, unsigned int delta, int width) {
    State r;
    r.v = __shfl_down_sync(0xffffffffu, s.v, delta, width);
    r.i = static_cast<int64_t>(
        __shfl_down_sync(0xffffffffu, static_cast<long long>(s.i), delta, width));
    return r;
  }
  template <typename scalar_t>
  __device__ __forceinline__ static void write(const State& s, scalar_t* out, int64_t* pos,
                                               int64_t o, int64_t /*P*/) {
    out[o] = static_cast<scalar_t>(s.v);
    if constexpr (kPos) pos[o] = s.i;
  }
  __device__ __forceinline__ static void store_partial(const State& s, acc_t* wv, int64_t* wi,
                                                       int64_t o) {
    wv[o] = s.v;
    wi[o] = s.i;
  }
  __device__ __forceinline__ static State load_partial(const acc_t* wv, const int64_t* wi,
                                                       int64_t o) {
    return {wv[o], wi[o]};
  }
};

template <typename acc_t>
struct SumOp {
  static constexpr bool kTracksPos = false;
  struct State {
    acc_t v;
  };
  __device__ __forceinline__ static State identity() { return {acc_t(0)}; }
  __device__ __forceinline__ static void combine(State& a, const State& b) { a.v += b.v; }
  __device__ __forceinline__ static void add(State& s, acc_t v, int64_t /*i*/) { s.v += v; }
  __device__ __forceinline__ static State shfl_down(const State& s, unsigned int delta, int width) {
    return {__shfl_down_sync(0xffffffffu, s.v, delta, width)};
  }
  template <typename scalar_t>
  __device__ __forceinline__ static void write(const State& s, scalar_t* out, int64_t* /*pos*/,
                                               int64_t o, int64_t P) {
    out[o] = static_cast<scalar_t>(div_rn(s.v, static_cast<acc_t>(P)));
  }
  __device__ __forceinline__ static void store_partial(const State& s, acc_t* wv, int64_t* /*wi*/,
                                                       int64_t o) {
    wv[o] = s.v;
  }
  __device__ __forceinline__ static State load_partial(const acc_t* wv, const int64_t* /*wi*/,
                                                       int64_t o) {
    return {wv[o]};
  }
};

// Adds src[i * stride] for i = first, first + step, ... < end to st in that order. Four values
// are loaded before their adds: each add of the max depends on the one before, and loads
// issued between them would wait for it.
template <typename Op, typename scalar_t, typename index_t>
__device__ __forceinline__ void add_cells(typename Op::State& st, const scalar_t* __restrict__ src,
                                          index_t first, index_t end, index_t step,
                                          index_t stride) {
  using acc_t = at::opmath_type<scalar_t>;
  index_t i = first;
  for (; end - i > 3 * step; i += 4 * step) {
    acc_t v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = static_cast<acc_t>(src[(i + k * step) * stride]);
#pragma unroll
    for (int k = 0; k < 4; ++k) Op::add(st, v[k], i + k * step);
  }
  for (; i < end; i += step) Op::add(st, static_cast<acc_t>(src[i * stride]), i);
}

// Contiguous rows of P <= kRowsMaxP cells: G lanes per row (8 for P <= 8, else 32), kThreads / G
// rows per block.
constexpr int64_t kRowsMaxP = 512;

template <typename scalar_t, typename index_t, typename Op, int G>
__global__ void __launch_bounds__(kThreads)
    global_rows_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                       int64_t* __restrict__ pos, const index_t rows, const index_t P) {
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  auto st = Op::identity();
  if (row < rows) {
    add_cells<Op>(st, in + static_cast<index_t>(row) * P, static_cast<index_t>(lane), P,
                  static_cast<index_t>(G), index_t(1));
  }
  // Every lane of the warp takes part in the shuffles (no early return above).
#pragma unroll
  for (int delta = G / 2; delta > 0; delta /= 2) {
    const auto other = Op::shfl_down(st, delta, G);
    Op::combine(st, other);
  }
  if (lane == 0 && row < rows) Op::write(st, out, pos, row, static_cast<int64_t>(P));
}

// (N', P, C') tiles: block b = (n*S + s)*CB + cb reduces channels [cb*CT, cb*CT + CT) of batch
// n over cells [s*chunk, (s+1)*chunk), with L = kThreads / CT lanes along the cells.
template <typename scalar_t, typename index_t, typename Op>
__global__ void __launch_bounds__(kThreads)
    global_tiled_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                        int64_t* __restrict__ pos, at::opmath_type<scalar_t>* __restrict__ wv,
                        int64_t* __restrict__ wi, const index_t C, const index_t P,
                        const index_t chunk, const int CT, const int L, const int half_lanes,
                        const int CB, const int S) {
  using State = typename Op::State;
  __shared__ State sh[kThreads];
  int64_t b = blockIdx.x;
  const int cb = static_cast<int>(b % CB);
  b /= CB;
  const int s = static_cast<int>(b % S);
  const index_t n = static_cast<index_t>(b / S);
  const int tid = threadIdx.x;
  const int ct = tid % CT, cl = tid / CT;
  const index_t c = static_cast<index_t>(cb) * CT + ct;
  const bool active = cl < L && c < C;

  State st = Op::identity();
  if (active) {
    const index_t begin = static_cast<index_t>(s) * chunk;
    const index_t end = P - begin < chunk ? P : begin + chunk;
    add_cells<Op>(st, in + n * P * C + c, begin + static_cast<index_t>(cl), end,
                  static_cast<index_t>(L), C);
  }
  sh[tid] = st;
  __syncthreads();
  // Tree over the lanes of each channel: round h folds lane cl + h into lane cl.
  for (int h = half_lanes; h > 0; h /= 2) {
    if (active && cl < h && cl + h < L) {
      Op::combine(st, sh[tid + h * CT]);
      sh[tid] = st;
    }
    __syncthreads();
  }
  if (active && cl == 0) {
    const int64_t o = static_cast<int64_t>(n) * C + c;
    if (S == 1) {
      Op::write(st, out, pos, o, static_cast<int64_t>(P));
    } else {
      Op::store_partial(st, wv, wi, (static_cast<int64_t>(n) * S + s) * C + c);
    }
  }
}

// Combines the S partial results of each (n', c) in split order.
template <typename scalar_t, typename Op>
__global__ void __launch_bounds__(kThreads)
    global_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ wv,
                         const int64_t* __restrict__ wi, scalar_t* __restrict__ out,
                         int64_t* __restrict__ pos, const int64_t items, const int64_t C,
                         const int S, const int64_t P) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= items) return;
  const int64_t n = t / C, c = t - n * C;
  auto st = Op::identity();
  for (int s = 0; s < S; ++s) Op::combine(st, Op::load_partial(wv, wi, (n * S + s) * C + c));
  Op::write(st, out, pos, t, P);
}

template <typename scalar_t, typename index_t, typename Op>
void launch_rows(const scalar_t* in, scalar_t* out, int64_t* pos, int64_t rows, int64_t P,
                 cudaStream_t stream) {
  const int G = P <= 8 ? 8 : 32;
  const int64_t blocks = (rows + kThreads / G - 1) / (kThreads / G);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "torchpool: ", rows,
              " rows exceed the CUDA grid limit");
  const auto r = static_cast<index_t>(rows), p = static_cast<index_t>(P);
  const auto grid = static_cast<unsigned int>(blocks);
  if (G == 8) {
    global_rows_kernel<scalar_t, index_t, Op, 8><<<grid, kThreads, 0, stream>>>(in, out, pos, r, p);
  } else {
    global_rows_kernel<scalar_t, index_t, Op, 32><<<grid, kThreads, 0, stream>>>(in, out, pos, r, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, typename Op>
void launch_tiled(const Tensor& x, scalar_t* out, int64_t* pos, int64_t Nt, int64_t P, int64_t Ct,
                  cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int CT = static_cast<int>(std::min<int64_t>(Ct, kThreads));
  const int L = kThreads / CT;
  int lanes_pow2 = 1;
  while (lanes_pow2 < L) lanes_pow2 *= 2;
  const int64_t CB = (Ct + CT - 1) / CT;
  const int64_t tiles = CB * Nt;
  // Enough blocks to fill the GPU: split the cells when there are fewer tiles, keeping at least
  // 32 cells per lane.
  const int64_t target = 8 * static_cast<int64_t>(sm_count(x.device().index()));
  int64_t S = 1;
  if (tiles < target) {
    S = std::min<int64_t>((target + tiles - 1) / tiles, std::max<int64_t>(1, P / (32 * L)));
  }
  const int64_t chunk = (P + S - 1) / S;
  S = (P + chunk - 1) / chunk;
  Tensor wv, wi;
  acc_t* wv_ptr = nullptr;
  int64_t* wi_ptr = nullptr;
  if (S > 1) {
    wv = at::empty({Nt * S * Ct}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    wv_ptr = wv.mutable_data_ptr<acc_t>();
    if constexpr (Op::kTracksPos) {
      wi = at::empty({Nt * S * Ct}, x.options().dtype(at::kLong));
      wi_ptr = wi.mutable_data_ptr<int64_t>();
    }
  }
  const int64_t blocks = tiles * S;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "torchpool: ", blocks,
              " blocks exceed the CUDA grid limit");
  global_tiled_kernel<scalar_t, index_t, Op>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out, pos, wv_ptr, wi_ptr, static_cast<index_t>(Ct),
          static_cast<index_t>(P), static_cast<index_t>(chunk), CT, L, lanes_pow2 / 2,
          static_cast<int>(CB), static_cast<int>(S));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    const int64_t items = Nt * Ct;
    global_finish_kernel<scalar_t, Op><<<blocks_for(items), kThreads, 0, stream>>>(
        wv_ptr, wi_ptr, out, pos, items, Ct, static_cast<int>(S), P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Reduces x (dense in its layout) into out (N, C) and, for the max with positions, pos (N, C).
template <typename scalar_t, typename Op>
void global_fwd(const Tensor& x, const Tensor& out, int64_t* pos, bool cl) {
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / std::max<int64_t>(N * C, 1);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_index({x.numel()}, [&]<typename index_t>() {
    if (!cl && P <= kRowsMaxP) {
      launch_rows<scalar_t, index_t, Op>(in, o, pos, N * C, P, stream);
    } else {
      const int64_t Nt = cl ? N : N * C, Ct = cl ? C : 1;
      launch_tiled<scalar_t, index_t, Op>(x, o, pos, Nt, P, Ct, stream);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_input[n, c, cell] = grad[n, c] at the saved position and 0 elsewhere (max), or
// grad[n, c] / P (avg). One thread per input element.

template <typename scalar_t, typename index_t, bool CL, bool kMax>
__global__ void __launch_bounds__(kThreads)
    global_bwd_kernel(const scalar_t* __restrict__ gout, const int64_t* __restrict__ pos,
                      scalar_t* __restrict__ gin, const index_t C, const index_t P,
                      const index_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t64 >= items) return;
  const index_t t = static_cast<index_t>(t64);
  index_t nc, cell;
  if constexpr (CL) {
    const index_t r = t / C;
    const index_t c = t - r * C;
    const index_t n = r / P;
    cell = r - n * P;
    nc = n * C + c;
  } else {
    nc = t / P;
    cell = t - nc * P;
  }
  if constexpr (kMax) {
    gin[t] = pos[nc] == static_cast<int64_t>(cell) ? gout[nc] : static_cast<scalar_t>(acc_t(0));
  } else {
    gin[t] = static_cast<scalar_t>(div_rn(static_cast<acc_t>(gout[nc]), static_cast<acc_t>(P)));
  }
}

// pos null: average backward.
void global_bwd(const Tensor& go, const Tensor* pos, const Tensor& gin, bool cl) {
  const int64_t N = gin.size(0), C = gin.size(1), items = gin.numel(), P = items / (N * C);
  const int64_t* p = pos != nullptr ? pos->const_data_ptr<int64_t>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "global_pool_backward_cuda", [&] {
    const scalar_t* g = go.const_data_ptr<scalar_t>();
    scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
    dispatch_bool(pos != nullptr, [&]<bool kMax>() {
      dispatch_flat({items}, cl, [&]<typename index_t, bool CL>() {
        global_bwd_kernel<scalar_t, index_t, CL, kMax>
            <<<blocks_for(items), kThreads, 0, stream>>>(g, p, gi, static_cast<index_t>(C),
                                                         static_cast<index_t>(P),
                                                         static_cast<index_t>(items));
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Ops: binds these kernels to the op bodies of ops.h.

struct Backend : Hooks {
  static void global_max_fwd(const Tensor& x, const Tensor& out, const Tensor* pos, bool cl) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_max_pool_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      int64_t* p = pos != nullptr ? pos->mutable_data_ptr<int64_t>() : nullptr;
      dispatch_bool(pos != nullptr, [&]<bool kPos>() {
        global_fwd<scalar_t, MaxOp<acc_t, kPos>>(x, out, p, cl);
      });
    });
  }

  static void global_avg_fwd(const Tensor& x, const Tensor& out, bool cl) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_avg_pool_cuda", [&] {
      global_fwd<scalar_t, SumOp<at::opmath_type<scalar_t>>>(x, out, nullptr, cl);
    });
  }

  static void global_bwd(const Tensor& go, const Tensor* pos, const Tensor& gin, bool cl) {
    cuda::global_bwd(go, pos, gin, cl);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CUDA, m) { ops::register_global_pool_ops<Backend>(m); }

}  // namespace torchpool::cuda
