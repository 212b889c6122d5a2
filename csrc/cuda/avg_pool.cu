// CUDA average pool ops: forward and gather backward.
//
// Same thread layout as the max pool kernels (see cuda_utils.cuh, Cell). The divisor of each
// output is divisor_override when given, else the product over dims of PoolGeometry::avg_count
// (torch's rule). Sums run in a fixed order in float (double for double): deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace torchpool::cuda {
namespace {

using at::Tensor;
using c10::IntArrayRef;

// Forward: sum of the in-input cells of the window / divisor.
template <typename scalar_t, typename index_t, bool CL, int VEC>
__global__ void __launch_bounds__(kThreads)
    avg_fwd_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                   const PoolGeometry g, const index_t C, const index_t items,
                   const bool count_include_pad, const int64_t divisor_override) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t64 >= items) return;
  const index_t t = static_cast<index_t>(t64);

  const index_t IH = g.in[1], IW = g.in[2];
  const Cell<index_t, CL, VEC> o(t, g.out[0], g.out[1], g.out[2], C, g.in_plane());
  int64_t lo0, hi0, lo1, hi1, lo2, hi2;
  g.valid_cells(0, o.d, lo0, hi0);
  g.valid_cells(1, o.h, lo1, hi1);
  g.valid_cells(2, o.w, lo2, hi2);
  const index_t d0 = o.d * static_cast<index_t>(g.stride[0]) - static_cast<index_t>(g.pad[0]);
  const index_t h0 = o.h * static_cast<index_t>(g.stride[1]) - static_cast<index_t>(g.pad[1]);
  const index_t w0 = o.w * static_cast<index_t>(g.stride[2]) - static_cast<index_t>(g.pad[2]);

  acc_t sum[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sum[j] = acc_t(0);
  // No dilation: window cell k of output o sits at input coordinate o*stride - pad + k.
  const index_t id1 = d0 + static_cast<index_t>(hi0), ih1 = h0 + static_cast<index_t>(hi1),
                iw1 = w0 + static_cast<index_t>(hi2);
  for (index_t id = d0 + static_cast<index_t>(lo0); id < id1; ++id) {
    for (index_t ih = h0 + static_cast<index_t>(lo1); ih < ih1; ++ih) {
      const scalar_t* row = in + o.base + (id * IH + ih) * IW * o.step;
      for (index_t iw = w0 + static_cast<index_t>(lo2); iw < iw1; ++iw) {
        scalar_t v[VEC];
        load_vec<VEC>(row + iw * o.step, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[j] += static_cast<acc_t>(v[j]);
      }
    }
  }
  const int64_t divisor = divisor_override != 0
                              ? divisor_override
                              : g.avg_count(0, o.d, count_include_pad) *
                                    g.avg_count(1, o.h, count_include_pad) *
                                    g.avg_count(2, o.w, count_include_pad);
  const acc_t div = static_cast<acc_t>(divisor);
  scalar_t res[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) res[j] = static_cast<scalar_t>(div_rn(sum[j], div));
  store_vec<VEC>(out + (CL ? t * VEC : t), res);
}

template <typename scalar_t, typename index_t>
struct AvgFwd {
  const scalar_t* in;
  scalar_t* out;
  const PoolGeometry& g;
  int64_t N, C;
  bool count_include_pad;
  int64_t divisor_override;
  cudaStream_t stream;

  template <bool CL, int VEC>
  void run() const {
    const int64_t items = N * C * g.out_plane() / VEC;
    avg_fwd_kernel<scalar_t, index_t, CL, VEC><<<blocks_for(items), kThreads, 0, stream>>>(
        in, out, g, static_cast<index_t>(C), static_cast<index_t>(items), count_include_pad,
        divisor_override);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Backward: each thread owns input cells and sums grad / divisor over the outputs whose window
// contains the cell, in (od, oh, ow) order. No atomics: bit-identical across runs.
template <typename scalar_t, typename index_t, bool CL, int VEC>
__global__ void __launch_bounds__(kThreads)
    avg_bwd_kernel(const scalar_t* __restrict__ gout, scalar_t* __restrict__ gin,
                   const PoolGeometry g, const index_t C, const index_t items,
                   const bool count_include_pad, const int64_t divisor_override) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t64 >= items) return;
  const index_t t = static_cast<index_t>(t64);

  const index_t OH = g.out[1], OW = g.out[2];
  const Cell<index_t, CL, VEC> i(t, g.in[0], g.in[1], g.in[2], C, g.out_plane());
  int64_t lo0, hi0, lo1, hi1, lo2, hi2;
  g.covering_outputs(0, i.d, lo0, hi0);
  g.covering_outputs(1, i.h, lo1, hi1);
  g.covering_outputs(2, i.w, lo2, hi2);
  const bool fixed = divisor_override != 0;
  const index_t od1 = hi0, oh1 = hi1, ow1 = hi2;

  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  for (index_t od = lo0; od < od1; ++od) {
    const int64_t cd = fixed ? divisor_override : g.avg_count(0, od, count_include_pad);
    for (index_t oh = lo1; oh < oh1; ++oh) {
      const int64_t cdh = fixed ? divisor_override : cd * g.avg_count(1, oh, count_include_pad);
      const index_t orow = i.base + (od * OH + oh) * OW * i.step;
      for (index_t ow = lo2; ow < ow1; ++ow) {
        const acc_t div = static_cast<acc_t>(
            fixed ? divisor_override : cdh * g.avg_count(2, ow, count_include_pad));
        scalar_t gv[VEC];
        load_vec<VEC>(gout + orow + ow * i.step, gv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += div_rn(static_cast<acc_t>(gv[j]), div);
      }
    }
  }
  scalar_t res[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) res[j] = static_cast<scalar_t>(acc[j]);
  store_vec<VEC>(gin + (CL ? t * VEC : t), res);
}

template <typename scalar_t, typename index_t>
struct AvgBwd {
  const scalar_t* gout;
  scalar_t* gin;
  const PoolGeometry& g;
  int64_t N, C;
  bool count_include_pad;
  int64_t divisor_override;
  cudaStream_t stream;

  template <bool CL, int VEC>
  void run() const {
    const int64_t items = N * C * g.in_plane() / VEC;
    avg_bwd_kernel<scalar_t, index_t, CL, VEC><<<blocks_for(items), kThreads, 0, stream>>>(
        gout, gin, g, static_cast<index_t>(C), static_cast<index_t>(items), count_include_pad,
        divisor_override);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Average pools have no dilation.
PoolGeometry avg_geometry(const char* op, IntArrayRef sizes, IntArrayRef kernel, IntArrayRef stride,
                          IntArrayRef pad_before, IntArrayRef pad_after, bool ceil_mode,
                          std::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": divisor_override must be non-zero");
  const std::vector<int64_t> ones(kernel.size(), 1);
  return make_geometry(op, sizes, kernel, stride, pad_before, pad_after, ones, ceil_mode);
}

Tensor avg_pool(const Tensor& self, IntArrayRef kernel, IntArrayRef stride, IntArrayRef pad_before,
                IntArrayRef pad_after, bool ceil_mode, bool count_include_pad,
                std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool";
  check_floating(op, "input", self);
  const PoolGeometry g = avg_geometry(op, self.sizes(), kernel, stride, pad_before, pad_after,
                                      ceil_mode, divisor_override);
  const c10::cuda::CUDAGuard guard(self.device());
  const auto fmt = layout_of(self);
  const Tensor x = self.contiguous(fmt);
  Tensor out = at::empty(output_shape(g, self.sizes()), self.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const bool cl = is_channels_last(fmt);
  const int64_t N = x.size(0), C = x.size(1), over = divisor_override.value_or(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool_cuda", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (needs_int64({x.numel(), out.numel()})) {
      dispatch_layout<scalar_t, int64_t>(
          cl, 1, AvgFwd<scalar_t, int64_t>{in, o, g, N, C, count_include_pad, over, stream});
    } else {
      const int vec =
          cl ? channel_vec<scalar_t>(C, {{in, sizeof(scalar_t)}, {o, sizeof(scalar_t)}}) : 1;
      dispatch_layout<scalar_t, int32_t>(
          cl, vec, AvgFwd<scalar_t, int32_t>{in, o, g, N, C, count_include_pad, over, stream});
    }
  });
  return out;
}

Tensor avg_pool_backward(const Tensor& grad_output, IntArrayRef input_size, IntArrayRef kernel,
                         IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                         bool ceil_mode, bool count_include_pad,
                         std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool_backward";
  check_floating(op, "grad_output", grad_output);
  const PoolGeometry g = avg_geometry(op, input_size, kernel, stride, pad_before, pad_after,
                                      ceil_mode, divisor_override);
  check_output_shape(op, "grad_output", grad_output, g, input_size);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto fmt = layout_of(grad_output);
  const Tensor go = grad_output.contiguous(fmt);
  Tensor gin = at::empty(input_size, grad_output.options().memory_format(fmt));
  if (gin.numel() == 0) return gin;
  const bool cl = is_channels_last(fmt);
  const int64_t N = gin.size(0), C = gin.size(1), over = divisor_override.value_or(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "avg_pool_backward_cuda", [&] {
    const scalar_t* gout = go.const_data_ptr<scalar_t>();
    scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
    if (needs_int64({gin.numel(), go.numel()})) {
      dispatch_layout<scalar_t, int64_t>(
          cl, 1, AvgBwd<scalar_t, int64_t>{gout, gi, g, N, C, count_include_pad, over, stream});
    } else {
      const int vec =
          cl ? channel_vec<scalar_t>(C, {{gout, sizeof(scalar_t)}, {gi, sizeof(scalar_t)}}) : 1;
      dispatch_layout<scalar_t, int32_t>(
          cl, vec, AvgBwd<scalar_t, int32_t>{gout, gi, g, N, C, count_include_pad, over, stream});
    }
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, CUDA, m) {
  m.impl("avg_pool", &avg_pool);
  m.impl("avg_pool_backward", &avg_pool_backward);
}

}  // namespace torchpool::cuda
