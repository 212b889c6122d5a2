// Binds the kernel templates of kernels.h to dtypes and layouts and fills a Kernels table.
// Included by each instruction-set translation unit right after kernels.h.

namespace TORCHPOOL_CPU_NS {

#define TORCHPOOL_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.scalar_type(), NAME, __VA_ARGS__)

template <typename scalar_t, typename pos_t>
void max_fwd_typed(const Tensor& in, const Tensor& out, const Tensor* pos, const PoolGeometry& g,
                   bool cl) {
  const scalar_t* x = in.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t N = in.size(0), C = in.size(1);
  if (pos) {
    pos_t* p = pos->mutable_data_ptr<pos_t>();
    cl ? max_fwd_cl<scalar_t, pos_t, true>(x, y, p, g, N, C)
       : max_fwd_planar<scalar_t, pos_t, true>(x, y, p, g, N * C);
  } else {
    cl ? max_fwd_cl<scalar_t, pos_t, false>(x, y, nullptr, g, N, C)
       : max_fwd_planar<scalar_t, pos_t, false>(x, y, nullptr, g, N * C);
  }
}

inline void max_fwd(const Tensor& in, const Tensor& out, const Tensor* pos, const PoolGeometry& g,
                    bool cl) {
  TORCHPOOL_DISPATCH(in, "max_pool", [&] {
    if (pos && pos->scalar_type() == at::kInt) {
      max_fwd_typed<scalar_t, int32_t>(in, out, pos, g, cl);
    } else {
      max_fwd_typed<scalar_t, uint8_t>(in, out, pos, g, cl);
    }
  });
}

inline void max_bwd(const Tensor& gout, const Tensor& pos, const Tensor& gin, const PoolGeometry& g,
                    bool cl) {
  const int64_t N = gin.size(0), C = gin.size(1);
  TORCHPOOL_DISPATCH(gout, "max_pool_backward", [&] {
    auto run = [&](auto* p) {
      const scalar_t* go = gout.const_data_ptr<scalar_t>();
      scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
      cl ? max_bwd_cl(go, p, gi, g, N, C) : max_bwd_planar(go, p, gi, g, N * C);
    };
    if (pos.scalar_type() == at::kInt) {
      run(pos.const_data_ptr<int32_t>());
    } else {
      run(pos.const_data_ptr<uint8_t>());
    }
  });
}

inline void max_indices(const Tensor& pos, const Tensor& idx, const PoolGeometry& g, bool cl) {
  const int64_t planes = pos.size(0) * pos.size(1), C = pos.size(1);
  int64_t* out = idx.mutable_data_ptr<int64_t>();
  if (pos.scalar_type() == at::kInt) {
    pos_to_index(pos.const_data_ptr<int32_t>(), out, g, planes, C, cl);
  } else {
    pos_to_index(pos.const_data_ptr<uint8_t>(), out, g, planes, C, cl);
  }
}

inline void avg_fwd(const Tensor& in, const Tensor& out, const PoolGeometry& g, bool cl,
                    bool count_include_pad, int64_t divisor_override) {
  const int64_t N = in.size(0), C = in.size(1);
  TORCHPOOL_DISPATCH(in, "avg_pool", [&] {
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    cl ? avg_fwd_cl(x, y, g, N, C, count_include_pad, divisor_override)
       : avg_fwd_planar(x, y, g, N * C, count_include_pad, divisor_override);
  });
}

inline void avg_bwd(const Tensor& gout, const Tensor& gin, const PoolGeometry& g, bool cl,
                    bool count_include_pad, int64_t divisor_override) {
  const int64_t N = gin.size(0), C = gin.size(1);
  TORCHPOOL_DISPATCH(gout, "avg_pool_backward", [&] {
    const scalar_t* go = gout.const_data_ptr<scalar_t>();
    scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
    cl ? avg_bwd_cl(go, gi, g, N, C, count_include_pad, divisor_override)
       : avg_bwd_planar(go, gi, g, N * C, count_include_pad, divisor_override);
  });
}

// Calls f(pos_t{}) for the dtype of the global max's saved cells (uint8, int32 or int64:
// global_position_dtype).
template <typename F>
inline void with_position_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kByte: f(uint8_t{}); break;
    case at::kInt: f(int32_t{}); break;
    default: f(int64_t{}); break;
  }
}

// Planes of one cell take the planar kernels in either layout: the two layouts are the same then,
// and those kernels copy such planes (one_cell_planes).
inline void global_max_fwd(const Tensor& in, const Tensor& out, const Tensor* pos, bool cl) {
  const int64_t N = in.size(0), C = in.size(1), P = plane_cells(in.sizes());
  TORCHPOOL_DISPATCH(in, "global_max_pool", [&] {
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    if (pos) {
      with_position_type(pos->scalar_type(), [&](auto zero) {
        auto* p = pos->mutable_data_ptr<decltype(zero)>();
        cl && P > 1 ? global_max_cl<scalar_t, true>(x, y, p, N, C, P)
           : global_max_planar<scalar_t, true>(x, y, p, N * C, P);
      });
    } else {
      uint8_t* p = nullptr;
      cl && P > 1 ? global_max_cl<scalar_t, false>(x, y, p, N, C, P)
         : global_max_planar<scalar_t, false>(x, y, p, N * C, P);
    }
  });
}

inline void global_avg_fwd(const Tensor& in, const Tensor& out, bool cl) {
  const int64_t N = in.size(0), C = in.size(1), P = plane_cells(in.sizes());
  TORCHPOOL_DISPATCH(in, "global_avg_pool", [&] {
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    cl && P > 1 ? global_avg_cl(x, y, N, C, P) : global_avg_planar(x, y, N * C, P);
  });
}

inline void global_bwd(const Tensor& gout, const Tensor* pos, const Tensor& gin, bool cl) {
  const int64_t N = gin.size(0), C = gin.size(1), P = plane_cells(gin.sizes());
  TORCHPOOL_DISPATCH(gout, "global_pool_backward", [&] {
    const scalar_t* go = gout.const_data_ptr<scalar_t>();
    scalar_t* gi = gin.mutable_data_ptr<scalar_t>();
    if (pos) {
      with_position_type(pos->scalar_type(), [&](auto zero) {
        global_bwd<scalar_t, true>(go, pos->const_data_ptr<decltype(zero)>(), gi, N, C, P, cl);
      });
    } else {
      global_bwd<scalar_t, false>(go, static_cast<const uint8_t*>(nullptr), gi, N, C, P, cl);
    }
  });
}

#undef TORCHPOOL_DISPATCH

inline const torchpool::cpu::Kernels& table(const char* isa) {
  static const torchpool::cpu::Kernels t{isa,         &max_fwd,        &max_bwd,
                                         &max_indices, &avg_fwd,        &avg_bwd,
                                         &global_max_fwd, &global_avg_fwd, &global_bwd};
  return t;
}

}  // namespace TORCHPOOL_CPU_NS
