// CUDA max pool ops: forward (with or without window positions), gather backward, positions to
// int64 indices.
//
// A thread owns one output cell (forward) or input cell (backward) and computes its window
// geometry once (see Work in cuda_utils.cuh); it then handles that cell for several (n, c)
// planes (contiguous tensors) or for every batch entry of a vector of channels (channels-last,
// 16-byte loads when C and the pointers allow it). The window scan order
// (kd, kh, kw) and the update rule match torch and the CPU kernels, so values, positions and the
// fixed-order backward sums are reproducible.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"
#include "ops.h"

namespace torchpool::cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Forward: max over the in-input cells of each window; padded cells never win. Starts at -inf
// with the position of the first in-input cell, takes v when v > max or v is NaN.
//
// Lanes: channels-last, LANES consecutive channels (one vector load per window cell);
// contiguous, the same cell of LANES consecutive planes (the last group may be partial).

template <typename scalar_t, typename index_t, bool CL, int LANES, typename pos_t, bool kPos>
__global__ void __launch_bounds__(kThreads)
    max_fwd_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                   pos_t* __restrict__ pos, const PoolGeometry g, const Work<index_t> w) {
  using acc_t = at::opmath_type<scalar_t>;
  // This thread's output cell t.s and first channel t.c.
  PoolThread<index_t, CL, LANES> t;
  if (!pool_thread(w, g, t)) return;

  const CellRanges<index_t> r = output_cell_window(g, t.s);
  const index_t od = r.d, oh = r.h, ow = r.w;
  const int kd0 = static_cast<int>(r.lo[0]), kd1 = static_cast<int>(r.hi[0]);
  const int kh0 = static_cast<int>(r.lo[1]), kh1 = static_cast<int>(r.hi[1]);
  const int kw0 = static_cast<int>(r.lo[2]), kw1 = static_cast<int>(r.hi[2]);
  const int KH = static_cast<int>(g.kernel[1]), KW = static_cast<int>(g.kernel[2]);
  const int first = (kd0 * KH + kh0) * KW + kw0;
  const index_t IH = g.in[1], IW = g.in[2];
  const index_t dil0 = g.dilation[0], dil1 = g.dilation[1], dil2 = g.dilation[2];
  const index_t d0 = od * static_cast<index_t>(g.stride[0]) - static_cast<index_t>(g.pad[0]);
  const index_t h0 = oh * static_cast<index_t>(g.stride[1]) - static_cast<index_t>(g.pad[1]);
  const index_t w0 = ow * static_cast<index_t>(g.stride[2]) - static_cast<index_t>(g.pad[2]);

  for_each_outer<index_t, CL, LANES>(w, [&](const index_t yi, const int lanes) {
    const scalar_t* base = in + yi * t.in_outer + t.c;
    acc_t best[LANES];
    int where[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
      best[j] = neg_inf<acc_t>();
      where[j] = first;
    }
    for (int kd = kd0; kd < kd1; ++kd) {
      const index_t id = d0 + kd * dil0;
      for (int kh = kh0; kh < kh1; ++kh) {
        const index_t ih = h0 + kh * dil1;
        const scalar_t* row = base + (id * IH + ih) * IW * t.step;
        const int kbase = (kd * KH + kh) * KW;
        for (int kw = kw0; kw < kw1; ++kw) {
          scalar_t v[LANES];
          load_lanes<CL, LANES>(row + (w0 + kw * dil2) * t.step, t.in_plane, lanes, v);
#pragma unroll
          for (int j = 0; j < LANES; ++j) {
            const acc_t a = static_cast<acc_t>(v[j]);
            if (a > best[j] || at::_isnan(a)) {
              best[j] = a;
              where[j] = kbase + kw;
            }
          }
        }
      }
    }
    const index_t dst = yi * t.out_outer + t.cell();
    store_lanes<CL, LANES>(out + dst, t.out_plane, lanes, best);
    if constexpr (kPos) store_lanes<CL, LANES>(pos + dst, t.out_plane, lanes, where);
  });
}

template <typename scalar_t, typename pos_t, bool kPos>
void max_fwd(const Tensor& x, const Tensor& out, const Tensor* pos, const PoolGeometry& g,
             bool cl) {
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  pos_t* p = kPos ? pos->mutable_data_ptr<pos_t>() : nullptr;
  launch_pool<scalar_t>(
      x, cl, g.out_plane(), {x.numel(), out.numel()},
      {{in, sizeof(scalar_t)}, {o, sizeof(scalar_t)}, {p, sizeof(pos_t)}},
      [&]<typename index_t, bool CL, int LANES>(const Work<index_t>& w, const Launch& l,
                                                cudaStream_t stream) {
        max_fwd_kernel<scalar_t, index_t, CL, LANES, pos_t, kPos>
            <<<l.grid, l.block, 0, stream>>>(in, o, p, g, w);
      });
}

// ---------------------------------------------------------------------------------------------
// Backward: each thread owns an input cell (for LANES planes or channels) and sums, in
// (od, oh, ow) order, the gradients of the covering outputs whose saved position is this cell.
// No atomics: bit-identical across runs.

template <typename scalar_t, typename index_t, bool CL, int LANES, typename pos_t>
__global__ void __launch_bounds__(kThreads)
    max_bwd_kernel(const scalar_t* __restrict__ gout, const pos_t* __restrict__ pos,
                   scalar_t* __restrict__ gin, const PoolGeometry g, const Work<index_t> w) {
  using acc_t = at::opmath_type<scalar_t>;
  // This thread's input cell t.s and first channel t.c.
  PoolThread<index_t, CL, LANES> t;
  if (!pool_thread(w, g, t)) return;

  const CellRanges<index_t> r = input_cell_outputs(g, t.s);
  const index_t id = r.d, ih = r.h, iw = r.w;
  const index_t od0 = r.lo[0], od1 = r.hi[0], oh0 = r.lo[1], oh1 = r.hi[1];
  const index_t ow0 = r.lo[2], ow1 = r.hi[2];
  const int KH = static_cast<int>(g.kernel[1]), KW = static_cast<int>(g.kernel[2]);
  const index_t OH = g.out[1], OW = g.out[2];
  const index_t s0 = g.stride[0], s1 = g.stride[1], s2 = g.stride[2];
  const index_t dil0 = g.dilation[0], dil1 = g.dilation[1], dil2 = g.dilation[2];
  // Offset of this cell in the window of output o along a dim: i + pad - o*stride (= k*dilation).
  const index_t rd = id + static_cast<index_t>(g.pad[0]);
  const index_t rh = ih + static_cast<index_t>(g.pad[1]);
  const index_t rw = iw + static_cast<index_t>(g.pad[2]);

  for_each_outer<index_t, CL, LANES>(w, [&](const index_t yi, const int lanes) {
    const index_t obase = yi * t.out_outer + t.c;
    acc_t acc[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) acc[j] = acc_t(0);
    for (index_t od = od0; od < od1; ++od) {
      index_t kd = rd - od * s0;
      if (dil0 != 1) {
        if (kd % dil0 != 0) continue;
        kd /= dil0;
      }
      for (index_t oh = oh0; oh < oh1; ++oh) {
        index_t kh = rh - oh * s1;
        if (dil1 != 1) {
          if (kh % dil1 != 0) continue;
          kh /= dil1;
        }
        const index_t orow = obase + (od * OH + oh) * OW * t.step;
        const int kbase = (static_cast<int>(kd) * KH + static_cast<int>(kh)) * KW;
        for (index_t ow = ow0; ow < ow1; ++ow) {
          index_t kw = rw - ow * s2;
          if (dil2 != 1) {
            if (kw % dil2 != 0) continue;
            kw /= dil2;
          }
          const int k = kbase + static_cast<int>(kw);
          const index_t off = orow + ow * t.step;
          pos_t p[LANES];
          load_lanes<CL, LANES>(pos + off, t.out_plane, lanes, p);
          if constexpr (CL) {
            // One vector load of the gradients, only when some channel's position matches.
            bool any = false;
#pragma unroll
            for (int j = 0; j < LANES; ++j) any |= static_cast<int>(p[j]) == k;
            if (any) {
              scalar_t gv[LANES];
              load_vec<LANES>(gout + off, gv);
#pragma unroll
              for (int j = 0; j < LANES; ++j) {
                if (static_cast<int>(p[j]) == k) acc[j] += static_cast<acc_t>(gv[j]);
              }
            }
          } else {
#pragma unroll
            for (int j = 0; j < LANES; ++j) {
              if (j < lanes && static_cast<int>(p[j]) == k) {
                acc[j] += static_cast<acc_t>(gout[off + j * t.out_plane]);
              }
            }
          }
        }
      }
    }
    store_lanes<CL, LANES>(gin + yi * t.in_outer + t.cell(), t.in_plane, lanes, acc);
  });
}

template <typename scalar_t, typename pos_t>
void max_bwd(const Tensor& go, const Tensor& pos, const Tensor& gin, const PoolGeometry& g,
             bool cl) {
  const scalar_t* gout = go.const_data_ptr<scalar_t>();
  const pos_t* p = pos.const_data_ptr<pos_t>();
  scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
  launch_pool<scalar_t>(
      gin, cl, g.in_plane(), {gin.numel(), go.numel()},
      {{gout, sizeof(scalar_t)}, {gi, sizeof(scalar_t)}, {p, sizeof(pos_t)}},
      [&]<typename index_t, bool CL, int LANES>(const Work<index_t>& w, const Launch& l,
                                                cudaStream_t stream) {
        max_bwd_kernel<scalar_t, index_t, CL, LANES, pos_t>
            <<<l.grid, l.block, 0, stream>>>(gout, p, gi, g, w);
      });
}

// ---------------------------------------------------------------------------------------------
// Window position -> flat index (id*IH + ih)*IW + iw into the input's spatial plane.

template <typename index_t, bool CL, typename pos_t>
__global__ void __launch_bounds__(kThreads)
    max_indices_kernel(const pos_t* __restrict__ pos, int64_t* __restrict__ idx,
                       const PoolGeometry g, const index_t C, const index_t items) {
  const int64_t t64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t64 >= items) return;
  const index_t t = static_cast<index_t>(t64);
  const index_t OP = static_cast<index_t>(g.out_plane());
  const index_t s = CL ? (t / C) % OP : t % OP;  // output cell
  index_t od, oh, ow;
  split_cell<index_t>(s, g.out[1], g.out[2], od, oh, ow);
  const int k = static_cast<int>(pos[t]);
  const int KH = static_cast<int>(g.kernel[1]), KW = static_cast<int>(g.kernel[2]);
  const int kw = k % KW, kh = (k / KW) % KH, kd = k / (KW * KH);
  const int64_t id = g.input_coord(0, od, kd);
  const int64_t ih = g.input_coord(1, oh, kh);
  const int64_t iw = g.input_coord(2, ow, kw);
  idx[t] = (id * g.in[1] + ih) * g.in[2] + iw;
}

template <typename pos_t>
void max_indices(const Tensor& pos, const Tensor& idx, const PoolGeometry& g, bool cl) {
  const pos_t* p = pos.const_data_ptr<pos_t>();
  int64_t* out = idx.mutable_data_ptr<int64_t>();
  const int64_t C = pos.size(1), items = pos.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = blocks_for(items);
  dispatch_flat({items}, cl, [&]<typename index_t, bool CL>() {
    max_indices_kernel<index_t, CL, pos_t><<<blocks, kThreads, 0, stream>>>(
        p, out, g, static_cast<index_t>(C), static_cast<index_t>(items));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Ops: binds these kernels to the op bodies of ops.h.

// Calls f.template operator()<pos_t>() for the dtype of a saved position tensor.
template <typename F>
void dispatch_pos(const Tensor& p, const F& f) {
  if (p.scalar_type() == at::kByte) {
    f.template operator()<uint8_t>();
  } else {
    f.template operator()<int32_t>();
  }
}

struct Backend : Hooks {
  static void max_fwd(const Tensor& x, const Tensor& out, const Tensor* pos, const PoolGeometry& g,
                      bool cl) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool_cuda", [&] {
      if (pos == nullptr) {
        cuda::max_fwd<scalar_t, uint8_t, false>(x, out, nullptr, g, cl);
      } else {
        dispatch_pos(*pos, [&]<typename pos_t>() {
          cuda::max_fwd<scalar_t, pos_t, true>(x, out, pos, g, cl);
        });
      }
    });
  }

  static void max_bwd(const Tensor& go, const Tensor& p, const Tensor& gin, const PoolGeometry& g,
                      bool cl) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "max_pool_backward_cuda", [&] {
      dispatch_pos(p, [&]<typename pos_t>() { cuda::max_bwd<scalar_t, pos_t>(go, p, gin, g, cl); });
    });
  }

  static void max_indices(const Tensor& p, const Tensor& idx, const PoolGeometry& g, bool cl) {
    dispatch_pos(p, [&]<typename pos_t>() { cuda::max_indices<pos_t>(p, idx, g, cl); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CUDA, m) { ops::register_max_pool_ops<Backend>(m); }

}  // namespace torchpool::cuda
