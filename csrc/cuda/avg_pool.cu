// CUDA average pool ops: forward and gather backward.
//
// Same work split as the max pool kernels (see Work in cuda_utils.cuh). The divisor of each
// output is divisor_override when given, else the product over dims of PoolGeometry::avg_count
// (torch's rule). Sums run in a fixed order in float (double for double): deterministic.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"
#include "ops.h"

namespace torchpool::cuda {
namespace {

using at::Tensor;

// Forward: sum of the in-input cells of the window / divisor. Lanes as in the max pool.
template <typename scalar_t, typename index_t, bool CL, int LANES>
__global__ void __launch_bounds__(kThreads)
    avg_fwd_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                   const PoolGeometry g, const Work<index_t> w, const bool count_include_pad,
                   const int64_t divisor_override) {
  using acc_t = at::opmath_type<scalar_t>;
  PoolThread<index_t, CL, LANES> t;
  if (!pool_thread(w, g, t)) return;

  const CellRanges<index_t> r = output_cell_window(g, t.s);
  const index_t od = r.d, oh = r.h, ow = r.w;
  const int64_t divisor = divisor_override != 0
                              ? divisor_override
                              : g.avg_count(0, od, count_include_pad) *
                                    g.avg_count(1, oh, count_include_pad) *
                                    g.avg_count(2, ow, count_include_pad);
  const acc_t div = static_cast<acc_t>(divisor);
  // No dilation: window cell k of output o sits at input coordinate o*stride - pad + k.
  const index_t d0 = od * static_cast<index_t>(g.stride[0]) - static_cast<index_t>(g.pad[0]);
  const index_t h0 = oh * static_cast<index_t>(g.stride[1]) - static_cast<index_t>(g.pad[1]);
  const index_t w0 = ow * static_cast<index_t>(g.stride[2]) - static_cast<index_t>(g.pad[2]);
  const index_t id0 = d0 + static_cast<index_t>(r.lo[0]);
  const index_t id1 = d0 + static_cast<index_t>(r.hi[0]);
  const index_t ih0 = h0 + static_cast<index_t>(r.lo[1]);
  const index_t ih1 = h0 + static_cast<index_t>(r.hi[1]);
  const index_t iw0 = w0 + static_cast<index_t>(r.lo[2]);
  const index_t iw1 = w0 + static_cast<index_t>(r.hi[2]);
  const index_t IH = g.in[1], IW = g.in[2];

  for_each_outer<index_t, CL, LANES>(w, [&](const index_t yi, const int lanes) {
    const scalar_t* base = in + yi * t.in_outer + t.c;
    acc_t sum[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) sum[j] = acc_t(0);
    for (index_t id = id0; id < id1; ++id) {
      for (index_t ih = ih0; ih < ih1; ++ih) {
        const scalar_t* row = base + (id * IH + ih) * IW * t.step;
        for (index_t iw = iw0; iw < iw1; ++iw) {
          scalar_t v[LANES];
          load_lanes<CL, LANES>(row + iw * t.step, t.in_plane, lanes, v);
#pragma unroll
          for (int j = 0; j < LANES; ++j) sum[j] += static_cast<acc_t>(v[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < LANES; ++j) sum[j] = div_rn(sum[j], div);
    store_lanes<CL, LANES>(out + yi * t.out_outer + t.cell(), t.out_plane, lanes, sum);
  });
}

// Backward: each thread owns an input cell and sums grad / divisor over the outputs whose window
// contains the cell, in (od, oh, ow) order. No atomics: bit-identical across runs.
template <typename scalar_t, typename index_t, bool CL, int LANES>
__global__ void __launch_bounds__(kThreads)
    avg_bwd_kernel(const scalar_t* __restrict__ gout, scalar_t* __restrict__ gin,
                   const PoolGeometry g, const Work<index_t> w, const bool count_include_pad,
                   const int64_t divisor_override) {
  using acc_t = at::opmath_type<scalar_t>;
  PoolThread<index_t, CL, LANES> t;
  if (!pool_thread(w, g, t)) return;

  const CellRanges<index_t> r = input_cell_outputs(g, t.s);
  const index_t od0 = r.lo[0], od1 = r.hi[0], oh0 = r.lo[1], oh1 = r.hi[1];
  const index_t ow0 = r.lo[2], ow1 = r.hi[2];
  const bool fixed = divisor_override != 0;
  const index_t OH = g.out[1], OW = g.out[2];

  for_each_outer<index_t, CL, LANES>(w, [&](const index_t yi, const int lanes) {
    const index_t obase = yi * t.out_outer + t.c;
    acc_t acc[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) acc[j] = acc_t(0);
    for (index_t od = od0; od < od1; ++od) {
      const int64_t cd = fixed ? divisor_override : g.avg_count(0, od, count_include_pad);
      for (index_t oh = oh0; oh < oh1; ++oh) {
        const int64_t cdh = fixed ? divisor_override : cd * g.avg_count(1, oh, count_include_pad);
        const index_t orow = obase + (od * OH + oh) * OW * t.step;
        for (index_t ow = ow0; ow < ow1; ++ow) {
          const acc_t div = static_cast<acc_t>(
              fixed ? divisor_override : cdh * g.avg_count(2, ow, count_include_pad));
          scalar_t gv[LANES];
          load_lanes<CL, LANES>(gout + orow + ow * t.step, t.out_plane, lanes, gv);
#pragma unroll
          for (int j = 0; j < LANES; ++j) acc[j] += div_rn(static_cast<acc_t>(gv[j]), div);
        }
      }
    }
    store_lanes<CL, LANES>(gin + yi * t.in_outer + t.cell(), t.in_plane, lanes, acc);
  });
}

// Ops: binds these kernels to the op bodies of ops.h.
struct Backend : Hooks {
  static void avg_fwd(const Tensor& x, const Tensor& out, const PoolGeometry& g, bool cl,
                      bool count_include_pad, int64_t over) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool_cuda", [&] {
      const scalar_t* in = x.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      launch_pool<scalar_t>(
          x, cl, g.out_plane(), {x.numel(), out.numel()},
          {{in, sizeof(scalar_t)}, {o, sizeof(scalar_t)}},
          [&]<typename index_t, bool CL, int LANES>(const Work<index_t>& w, const Launch& l,
                                                    cudaStream_t stream) {
            avg_fwd_kernel<scalar_t, index_t, CL, LANES>
                <<<l.grid, l.block, 0, stream>>>(in, o, g, w, count_include_pad, over);
          });
    });
  }

  static void avg_bwd(const Tensor& go, const Tensor& gin, const PoolGeometry& g, bool cl,
                      bool count_include_pad, int64_t over) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "avg_pool_backward_cuda", [&] {
      const scalar_t* gout = go.const_data_ptr<scalar_t>();
      scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
      launch_pool<scalar_t>(
          gin, cl, g.in_plane(), {gin.numel(), go.numel()},
          {{gout, sizeof(scalar_t)}, {gi, sizeof(scalar_t)}},
          [&]<typename index_t, bool CL, int LANES>(const Work<index_t>& w, const Launch& l,
                                                    cudaStream_t stream) {
            avg_bwd_kernel<scalar_t, index_t, CL, LANES>
                <<<l.grid, l.block, 0, stream>>>(gout, gi, g, w, count_include_pad, over);
          });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CUDA, m) { ops::register_avg_pool_ops<Backend>(m); }

}  // namespace torchpool::cuda
