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
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= w.inner) return;

  index_t s = static_cast<index_t>(x), c = 0;
  if constexpr (CL) {
    s = static_cast<index_t>(x) / w.groups;
    c = (static_cast<index_t>(x) - s * w.groups) * LANES;
  }
  index_t od, oh, ow;
  split_cell<index_t>(s, g.out[1], g.out[2], od, oh, ow);
  int64_t lo0, hi0, lo1, hi1, lo2, hi2;
  g.valid_cells(0, od, lo0, hi0);
  g.valid_cells(1, oh, lo1, hi1);
  g.valid_cells(2, ow, lo2, hi2);
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
  const index_t id0 = d0 + static_cast<index_t>(lo0), id1 = d0 + static_cast<index_t>(hi0);
  const index_t ih0 = h0 + static_cast<index_t>(lo1), ih1 = h0 + static_cast<index_t>(hi1);
  const index_t iw0 = w0 + static_cast<index_t>(lo2), iw1 = w0 + static_cast<index_t>(hi2);
  const index_t IH = g.in[1], IW = g.in[2];

  const index_t in_plane = static_cast<index_t>(g.in_plane());
  const index_t out_plane = static_cast<index_t>(g.out_plane());
  const index_t step = CL ? w.C : 1;
  const index_t in_outer = CL ? in_plane * w.C : in_plane * LANES;
  const index_t out_outer = CL ? out_plane * w.C : out_plane * LANES;
  const index_t out_cell = CL ? s * w.C + c : s;

  for (int64_t y = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; y < w.outer;
       y += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const index_t yi = static_cast<index_t>(y);
    const int lanes = CL ? LANES : static_cast<int>(std::min<index_t>(LANES, w.planes - yi * LANES));
    const scalar_t* base = in + yi * in_outer + c;
    acc_t sum[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) sum[j] = acc_t(0);
    for (index_t id = id0; id < id1; ++id) {
      for (index_t ih = ih0; ih < ih1; ++ih) {
        const scalar_t* row = base + (id * IH + ih) * IW * step;
        for (index_t iw = iw0; iw < iw1; ++iw) {
          const scalar_t* p = row + iw * step;
          scalar_t v[LANES];
          if constexpr (CL) {
            load_vec<LANES>(p, v);
          } else {
#pragma unroll
            for (int j = 0; j < LANES; ++j) v[j] = j < lanes ? p[j * in_plane] : scalar_t(0);
          }
#pragma unroll
          for (int j = 0; j < LANES; ++j) sum[j] += static_cast<acc_t>(v[j]);
        }
      }
    }
    const index_t dst = yi * out_outer + out_cell;
    scalar_t res[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) res[j] = static_cast<scalar_t>(div_rn(sum[j], div));
    if constexpr (CL) {
      store_vec<LANES>(out + dst, res);
    } else {
#pragma unroll
      for (int j = 0; j < LANES; ++j) {
        if (j < lanes) out[dst + j * out_plane] = res[j];
      }
    }
  }
}

template <typename scalar_t, typename index_t>
struct AvgFwd {
  const scalar_t* in;
  scalar_t* out;
  const PoolGeometry& g;
  int64_t N, C;
  bool count_include_pad;
  int64_t divisor_override;
  c10::DeviceIndex device;
  cudaStream_t stream;

  template <bool CL, int LANES>
  void run() const {
    const auto w = make_work<index_t>(CL, LANES, N, C, g.out_plane());
    const Launch l = launch_for(w.inner, w.outer, device);
    avg_fwd_kernel<scalar_t, index_t, CL, LANES>
        <<<l.grid, l.block, 0, stream>>>(in, out, g, w, count_include_pad, divisor_override);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Backward: each thread owns an input cell and sums grad / divisor over the outputs whose window
// contains the cell, in (od, oh, ow) order. No atomics: bit-identical across runs.
template <typename scalar_t, typename index_t, bool CL, int LANES>
__global__ void __launch_bounds__(kThreads)
    avg_bwd_kernel(const scalar_t* __restrict__ gout, scalar_t* __restrict__ gin,
                   const PoolGeometry g, const Work<index_t> w, const bool count_include_pad,
                   const int64_t divisor_override) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= w.inner) return;

  index_t s = static_cast<index_t>(x), c = 0;
  if constexpr (CL) {
    s = static_cast<index_t>(x) / w.groups;
    c = (static_cast<index_t>(x) - s * w.groups) * LANES;
  }
  index_t id, ih, iw;
  split_cell<index_t>(s, g.in[1], g.in[2], id, ih, iw);
  int64_t lo0, hi0, lo1, hi1, lo2, hi2;
  g.covering_outputs(0, id, lo0, hi0);
  g.covering_outputs(1, ih, lo1, hi1);
  g.covering_outputs(2, iw, lo2, hi2);
  const index_t od0 = lo0, od1 = hi0, oh0 = lo1, oh1 = hi1, ow0 = lo2, ow1 = hi2;
  const bool fixed = divisor_override != 0;
  const index_t OH = g.out[1], OW = g.out[2];

  const index_t in_plane = static_cast<index_t>(g.in_plane());
  const index_t out_plane = static_cast<index_t>(g.out_plane());
  const index_t step = CL ? w.C : 1;
  const index_t in_outer = CL ? in_plane * w.C : in_plane * LANES;
  const index_t out_outer = CL ? out_plane * w.C : out_plane * LANES;
  const index_t in_cell = CL ? s * w.C + c : s;

  for (int64_t y = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; y < w.outer;
       y += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const index_t yi = static_cast<index_t>(y);
    const int lanes = CL ? LANES : static_cast<int>(std::min<index_t>(LANES, w.planes - yi * LANES));
    const index_t obase = yi * out_outer + c;
    acc_t acc[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) acc[j] = acc_t(0);
    for (index_t od = od0; od < od1; ++od) {
      const int64_t cd = fixed ? divisor_override : g.avg_count(0, od, count_include_pad);
      for (index_t oh = oh0; oh < oh1; ++oh) {
        const int64_t cdh = fixed ? divisor_override : cd * g.avg_count(1, oh, count_include_pad);
        const index_t orow = obase + (od * OH + oh) * OW * step;
        for (index_t ow = ow0; ow < ow1; ++ow) {
          const acc_t div = static_cast<acc_t>(
              fixed ? divisor_override : cdh * g.avg_count(2, ow, count_include_pad));
          const scalar_t* p = gout + orow + ow * step;
          scalar_t gv[LANES];
          if constexpr (CL) {
            load_vec<LANES>(p, gv);
          } else {
#pragma unroll
            for (int j = 0; j < LANES; ++j) gv[j] = j < lanes ? p[j * out_plane] : scalar_t(0);
          }
#pragma unroll
          for (int j = 0; j < LANES; ++j) acc[j] += div_rn(static_cast<acc_t>(gv[j]), div);
        }
      }
    }
    const index_t dst = yi * in_outer + in_cell;
    scalar_t res[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) res[j] = static_cast<scalar_t>(acc[j]);
    if constexpr (CL) {
      store_vec<LANES>(gin + dst, res);
    } else {
#pragma unroll
      for (int j = 0; j < LANES; ++j) {
        if (j < lanes) gin[dst + j * in_plane] = res[j];
      }
    }
  }
}

template <typename scalar_t, typename index_t>
struct AvgBwd {
  const scalar_t* gout;
  scalar_t* gin;
  const PoolGeometry& g;
  int64_t N, C;
  bool count_include_pad;
  int64_t divisor_override;
  c10::DeviceIndex device;
  cudaStream_t stream;

  template <bool CL, int LANES>
  void run() const {
    const auto w = make_work<index_t>(CL, LANES, N, C, g.in_plane());
    const Launch l = launch_for(w.inner, w.outer, device);
    avg_bwd_kernel<scalar_t, index_t, CL, LANES>
        <<<l.grid, l.block, 0, stream>>>(gout, gin, g, w, count_include_pad, divisor_override);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Ops: binds these kernels to the op bodies of ops.h.
struct Backend : Hooks {
  static void avg_fwd(const Tensor& x, const Tensor& out, const PoolGeometry& g, bool cl,
                      bool count_include_pad, int64_t over) {
    const int64_t N = x.size(0), C = x.size(1);
    const c10::DeviceIndex device = x.device().index();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool_cuda", [&] {
      const scalar_t* in = x.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      if (needs_int64({x.numel(), out.numel()})) {
        dispatch_layout<scalar_t, int64_t>(
            cl, 1, AvgFwd<scalar_t, int64_t>{in, o, g, N, C, count_include_pad, over, device, stream});
      } else {
        const int vec =
            cl ? channel_vec<scalar_t>(C, {{in, sizeof(scalar_t)}, {o, sizeof(scalar_t)}}) : 1;
        dispatch_layout<scalar_t, int32_t>(
            cl, vec, AvgFwd<scalar_t, int32_t>{in, o, g, N, C, count_include_pad, over, device, stream});
      }
    });
  }

  static void avg_bwd(const Tensor& go, const Tensor& gin, const PoolGeometry& g, bool cl,
                      bool count_include_pad, int64_t over) {
    const int64_t N = gin.size(0), C = gin.size(1);
    const c10::DeviceIndex device = gin.device().index();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "avg_pool_backward_cuda", [&] {
      const scalar_t* gout = go.const_data_ptr<scalar_t>();
      scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
      if (needs_int64({gin.numel(), go.numel()})) {
        dispatch_layout<scalar_t, int64_t>(
            cl, 1, AvgBwd<scalar_t, int64_t>{gout, gi, g, N, C, count_include_pad, over, device, stream});
      } else {
        const int vec =
            cl ? channel_vec<scalar_t>(C, {{gout, sizeof(scalar_t)}, {gi, sizeof(scalar_t)}}) : 1;
        dispatch_layout<scalar_t, int32_t>(
            cl, vec, AvgBwd<scalar_t, int32_t>{gout, gi, g, N, C, count_include_pad, over, device, stream});
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CUDA, m) { ops::register_avg_pool_ops<Backend>(m); }

}  // namespace torchpool::cuda
