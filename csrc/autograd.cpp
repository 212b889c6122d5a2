// Autograd of the pools, registered in C++ for every device.
//
// A pool call is short next to the Python steps around it when the caches are cold (as in a
// model, where each pool follows a layer that swept them): a Python autograd.Function cost
// 30-40 us more per training call than an autograd node built here (benchmarks/NOTES.md 101).
// Under functorch transforms, which refuse C++ autograd Functions, torchpool.functional takes
// the Python Functions of torchpool/autograd.py instead.
//
// Each kernel builds a node only when grad mode is on and its tensor requires grad; otherwise it
// calls the device kernel straight away. The backward ops are differentiable too (double
// backward, gradient penalties): a pooling backward is linear in grad_output, and its own
// derivative is a gather at the saved positions (max) or the forward pool again (average).
// Backward returns the gradient in the pooled input's layout.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace torchpool {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using IntList = c10::IntArrayRef;

// The ops' C++ signatures.
namespace sig {
using Tensors = std::tuple<at::Tensor, at::Tensor>;
using MaxPool = at::Tensor(const at::Tensor&, IntList, IntList, IntList, IntList, IntList, bool);
using MaxPoolWithPos = Tensors(const at::Tensor&, IntList, IntList, IntList, IntList, IntList,
                               bool);
using MaxPoolBackward = at::Tensor(const at::Tensor&, const at::Tensor&, IntList, IntList, IntList,
                                   IntList, IntList, IntList, bool, std::optional<bool>, bool);
using MaxPoolIndices = at::Tensor(const at::Tensor&, IntList, IntList, IntList, IntList, IntList,
                                  IntList, bool, bool);
using AvgPool = at::Tensor(const at::Tensor&, IntList, IntList, IntList, IntList, bool, bool,
                           std::optional<int64_t>);
using AvgPoolBackward = at::Tensor(const at::Tensor&, IntList, IntList, IntList, IntList, IntList,
                                   bool, bool, std::optional<int64_t>, std::optional<bool>);
using GlobalPool = at::Tensor(const at::Tensor&);
using GlobalMaxPoolWithPos = Tensors(const at::Tensor&);
using GlobalMaxPoolBackward = at::Tensor(const at::Tensor&, const at::Tensor&, IntList, bool, bool);
using GlobalAvgPoolBackward = at::Tensor(const at::Tensor&, IntList, bool);
}  // namespace sig

// An op of the library by name, typed by the handle it initializes.
struct Op {
  const char* name;
  template <typename Signature>
  operator c10::TypedOperatorHandle<Signature>() const {
    return c10::Dispatcher::singleton()
        .findSchemaOrThrow((std::string("torchpool::") + name).c_str(), "")
        .typed<Signature>();
  }
};

// Typed handles to the ops, found at first use.
struct Ops {
  template <typename Signature>
  using Handle = c10::TypedOperatorHandle<Signature>;

  Handle<sig::MaxPool> max_pool = Op{"max_pool"};
  Handle<sig::MaxPoolWithPos> max_pool_with_pos = Op{"max_pool_with_pos"};
  Handle<sig::MaxPoolBackward> max_pool_backward = Op{"max_pool_backward"};
  Handle<sig::MaxPoolIndices> max_pool_indices = Op{"max_pool_indices"};
  Handle<sig::AvgPool> avg_pool = Op{"avg_pool"};
  Handle<sig::AvgPoolBackward> avg_pool_backward = Op{"avg_pool_backward"};
  Handle<sig::GlobalPool> global_max_pool = Op{"global_max_pool"};
  Handle<sig::GlobalMaxPoolWithPos> global_max_pool_with_pos = Op{"global_max_pool_with_pos"};
  Handle<sig::GlobalMaxPoolBackward> global_max_pool_backward = Op{"global_max_pool_backward"};
  Handle<sig::GlobalPool> global_avg_pool = Op{"global_avg_pool"};
  Handle<sig::GlobalAvgPoolBackward> global_avg_pool_backward = Op{"global_avg_pool_backward"};
};

const Ops& ops() {
  static const Ops handles;
  return handles;
}

bool builds_graph(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

// What a global backward needs of the pooled input: its shape and whether it is channels_last.
void save_input(AutogradContext* ctx, const at::Tensor& self) {
  ctx->saved_data["input_size"] = self.sizes().vec();
  ctx->saved_data["channels_last"] = is_channels_last(layout_of(self));
}

std::vector<int64_t> input_size(AutogradContext* ctx) {
  return ctx->saved_data["input_size"].toIntVector();
}

bool channels_last(AutogradContext* ctx) { return ctx->saved_data["channels_last"].toBool(); }

// A max pool forward's result: (out), or with kWithPos (out, pos); pos, the position of each
// maximum, is saved for backward either way and is not differentiable.
template <bool kWithPos>
variable_list outputs(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& pos) {
  ctx->save_for_backward({pos});
  if constexpr (kWithPos) {
    ctx->mark_non_differentiable({pos});
    return {out, pos};
  }
  return {out};
}

// (N, C, *spatial) -> (N, C); the gradient goes to the first maximum of each plane (pos: its
// int64 cell).
template <bool kWithPos>
struct GlobalMaxPool : torch::autograd::Function<GlobalMaxPool<kWithPos>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& self) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, pos] = ops().global_max_pool_with_pos.call(self);
    save_input(ctx, self);
    return outputs<kWithPos>(ctx, out, pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto pos = ctx->get_saved_variables()[0];
    return {ops().global_max_pool_backward.call(grads[0], pos, input_size(ctx),
                                                 channels_last(ctx), /*check_pos=*/false)};
  }
};

struct GlobalMaxPoolBackward : torch::autograd::Function<GlobalMaxPoolBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& pos,
                            c10::IntArrayRef size, bool cl, bool check_pos) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({pos});
    return ops().global_max_pool_backward.call(grad, pos, size, cl, check_pos);
  }

  // d(grad_input)/d(grad_output) picks each plane's saved cell (saved in the plane's narrowest
  // dtype; gather takes int64).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto pos = ctx->get_saved_variables()[0];
    const auto planes = grads[0].reshape({pos.size(0), pos.size(1), -1});
    const auto cells = pos.to(at::kLong).unsqueeze(-1);
    return {planes.gather(2, cells).squeeze(-1), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// (N, C, *spatial) -> (N, C); the gradient is spread evenly over each plane.
struct GlobalAvgPool : torch::autograd::Function<GlobalAvgPool> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& self) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_input(ctx, self);
    return ops().global_avg_pool.call(self);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ops().global_avg_pool_backward.call(grads[0], input_size(ctx), channels_last(ctx))};
  }
};

struct GlobalAvgPoolBackward : torch::autograd::Function<GlobalAvgPoolBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, c10::IntArrayRef size,
                            bool cl) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops().global_avg_pool_backward.call(grad, size, cl);
  }

  // The backward spreads g / count over each plane; its adjoint averages each plane.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ops().global_avg_pool.call(grads[0]), at::Tensor(), at::Tensor()};
  }
};

// A window pool's arguments as a backward needs them, kept in one saved int list: the pooled
// input's size (nd + 2), then nd values each of kernel_size, stride, pad_before, pad_after and
// dilation (1s for the average), then ceil_mode and the input's layout.
struct WindowArgs {
  std::vector<int64_t> v;

  WindowArgs(IntList size, IntList k, IntList s, IntList pb, IntList pa, IntList d, bool ceil,
             at::MemoryFormat layout) {
    v.reserve(size.size() + 5 * k.size() + 2);
    for (IntList list : {size, k, s, pb, pa, d}) {
      v.insert(v.end(), list.begin(), list.end());
    }
    v.push_back(ceil);
    v.push_back(static_cast<int64_t>(layout));
  }
  explicit WindowArgs(AutogradContext* ctx) : v(ctx->saved_data["window"].toIntVector()) {}
  void save(AutogradContext* ctx) { ctx->saved_data["window"] = std::move(v); }

  int64_t nd() const { return (static_cast<int64_t>(v.size()) - 4) / 6; }
  IntList size() const { return {v.data(), static_cast<size_t>(nd() + 2)}; }
  IntList list(int64_t i) const {
    return {v.data() + nd() + 2 + i * nd(), static_cast<size_t>(nd())};
  }
  IntList kernel() const { return list(0); }
  IntList stride() const { return list(1); }
  IntList pad_before() const { return list(2); }
  IntList pad_after() const { return list(3); }
  IntList dilation() const { return list(4); }
  bool ceil_mode() const { return v[v.size() - 2] != 0; }
  at::MemoryFormat layout() const { return static_cast<at::MemoryFormat>(v.back()); }
};

// The average's own arguments, besides the window's.
void save_avg(AutogradContext* ctx, bool count_include_pad, std::optional<int64_t> divisor) {
  ctx->saved_data["count_include_pad"] = count_include_pad;
  ctx->saved_data["divisor_override"] = divisor;
}
bool count_include_pad(AutogradContext* ctx) {
  return ctx->saved_data["count_include_pad"].toBool();
}
std::optional<int64_t> divisor_override(AutogradContext* ctx) {
  return ctx->saved_data["divisor_override"].toOptional<int64_t>();
}

// pos: the window position of each maximum.
template <bool kWithPos>
struct MaxPool : torch::autograd::Function<MaxPool<kWithPos>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& self, IntList k, IntList s,
                               IntList pb, IntList pa, IntList d, bool ceil) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, pos] = ops().max_pool_with_pos.call(self, k, s, pb, pa, d, ceil);
    WindowArgs(self.sizes(), k, s, pb, pa, d, ceil, layout_of(self)).save(ctx);
    return outputs<kWithPos>(ctx, out, pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WindowArgs a(ctx);
    const auto pos = ctx->get_saved_variables()[0];
    const auto grad = grads[0].contiguous(a.layout());
    const auto grad_input = ops().max_pool_backward.call(
        grad, pos, a.size(), a.kernel(), a.stride(), a.pad_before(), a.pad_after(), a.dilation(),
        a.ceil_mode(), is_channels_last(a.layout()), /*check_pos=*/false);
    return {grad_input, {}, {}, {}, {}, {}, {}};
  }
};

struct MaxPoolBackward : torch::autograd::Function<MaxPoolBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& pos,
                            IntList size, IntList k, IntList s, IntList pb, IntList pa, IntList d,
                            bool ceil, std::optional<bool> cl, bool check_pos) {
    at::AutoDispatchBelowADInplaceOrView guard;
    WindowArgs(size, k, s, pb, pa, d, ceil, backward_layout(grad, size.size(), cl)).save(ctx);
    ctx->save_for_backward({pos});
    return ops().max_pool_backward.call(grad, pos, size, k, s, pb, pa, d, ceil, cl, check_pos);
  }

  // d(grad_input)/d(grad_output) gathers each output's saved cell (positions the forward
  // checked, or was told were the forward's own).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WindowArgs a(ctx);
    const auto pos = ctx->get_saved_variables()[0];
    const auto index = ops().max_pool_indices.call(pos, a.size(), a.kernel(), a.stride(),
                                                  a.pad_before(), a.pad_after(), a.dilation(),
                                                  a.ceil_mode(), /*check_pos=*/false);
    const int64_t n = index.size(0), c = index.size(1);
    const auto picked =
        grads[0].reshape({n, c, -1}).gather(2, index.reshape({n, c, -1})).reshape(index.sizes());
    return {picked, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

struct AvgPool : torch::autograd::Function<AvgPool> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& self, IntList k, IntList s,
                            IntList pb, IntList pa, bool ceil, bool cip,
                            std::optional<int64_t> divisor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::vector<int64_t> ones(k.size(), 1);
    WindowArgs(self.sizes(), k, s, pb, pa, ones, ceil, layout_of(self)).save(ctx);
    save_avg(ctx, cip, divisor);
    return ops().avg_pool.call(self, k, s, pb, pa, ceil, cip, divisor);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WindowArgs a(ctx);
    const auto grad_input = ops().avg_pool_backward.call(
        grads[0].contiguous(a.layout()), a.size(), a.kernel(), a.stride(), a.pad_before(),
        a.pad_after(), a.ceil_mode(), count_include_pad(ctx), divisor_override(ctx),
        is_channels_last(a.layout()));
    return {grad_input, {}, {}, {}, {}, {}, {}, {}};
  }
};

struct AvgPoolBackward : torch::autograd::Function<AvgPoolBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, IntList size,
                            IntList k, IntList s, IntList pb, IntList pa, bool ceil, bool cip,
                            std::optional<int64_t> divisor, std::optional<bool> cl) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::vector<int64_t> ones(k.size(), 1);
    WindowArgs(size, k, s, pb, pa, ones, ceil, backward_layout(grad, size.size(), cl)).save(ctx);
    save_avg(ctx, cip, divisor);
    return ops().avg_pool_backward.call(grad, size, k, s, pb, pa, ceil, cip, divisor, cl);
  }

  // The backward spreads each output's gradient over its window; its adjoint is the pool.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WindowArgs a(ctx);
    const auto pooled = ops().avg_pool.call(
        grads[0].contiguous(a.layout()), a.kernel(), a.stride(), a.pad_before(), a.pad_after(),
        a.ceil_mode(), count_include_pad(ctx), divisor_override(ctx));
    return {pooled, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor max_pool(const at::Tensor& self, IntList k, IntList s, IntList pb, IntList pa,
                    IntList d, bool ceil) {
  if (builds_graph(self)) {
    return MaxPool<false>::apply(self, k, s, pb, pa, d, ceil)[0];
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().max_pool.call(self, k, s, pb, pa, d, ceil);
}

std::tuple<at::Tensor, at::Tensor> max_pool_with_pos(const at::Tensor& self, IntList k, IntList s,
                                                     IntList pb, IntList pa, IntList d,
                                                     bool ceil) {
  if (builds_graph(self)) {
    const auto r = MaxPool<true>::apply(self, k, s, pb, pa, d, ceil);
    return {r[0], r[1]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().max_pool_with_pos.call(self, k, s, pb, pa, d, ceil);
}

at::Tensor max_pool_backward(const at::Tensor& grad, const at::Tensor& pos, IntList size,
                             IntList k, IntList s, IntList pb, IntList pa, IntList d, bool ceil,
                             std::optional<bool> cl, bool check_pos) {
  if (builds_graph(grad)) {
    return MaxPoolBackward::apply(grad, pos, size, k, s, pb, pa, d, ceil, cl, check_pos);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().max_pool_backward.call(grad, pos, size, k, s, pb, pa, d, ceil, cl, check_pos);
}

at::Tensor avg_pool(const at::Tensor& self, IntList k, IntList s, IntList pb, IntList pa,
                    bool ceil, bool cip, std::optional<int64_t> divisor) {
  if (builds_graph(self)) {
    return AvgPool::apply(self, k, s, pb, pa, ceil, cip, divisor);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().avg_pool.call(self, k, s, pb, pa, ceil, cip, divisor);
}

at::Tensor avg_pool_backward(const at::Tensor& grad, IntList size, IntList k, IntList s,
                             IntList pb, IntList pa, bool ceil, bool cip,
                             std::optional<int64_t> divisor, std::optional<bool> cl) {
  if (builds_graph(grad)) {
    return AvgPoolBackward::apply(grad, size, k, s, pb, pa, ceil, cip, divisor, cl);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().avg_pool_backward.call(grad, size, k, s, pb, pa, ceil, cip, divisor, cl);
}

at::Tensor global_max_pool(const at::Tensor& self) {
  if (builds_graph(self)) {
    return GlobalMaxPool<false>::apply(self)[0];
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().global_max_pool.call(self);
}

std::tuple<at::Tensor, at::Tensor> global_max_pool_with_pos(const at::Tensor& self) {
  if (builds_graph(self)) {
    const auto r = GlobalMaxPool<true>::apply(self);
    return {r[0], r[1]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().global_max_pool_with_pos.call(self);
}

at::Tensor global_max_pool_backward(const at::Tensor& grad, const at::Tensor& pos,
                                    c10::IntArrayRef size, bool cl, bool check_pos) {
  if (builds_graph(grad)) {
    return GlobalMaxPoolBackward::apply(grad, pos, size, cl, check_pos);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().global_max_pool_backward.call(grad, pos, size, cl, check_pos);
}

at::Tensor global_avg_pool(const at::Tensor& self) {
  if (builds_graph(self)) {
    return GlobalAvgPool::apply(self);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().global_avg_pool.call(self);
}

at::Tensor global_avg_pool_backward(const at::Tensor& grad, c10::IntArrayRef size, bool cl) {
  if (builds_graph(grad)) {
    return GlobalAvgPoolBackward::apply(grad, size, cl);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops().global_avg_pool_backward.call(grad, size, cl);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, Autograd, m) {
  m.impl("max_pool", &max_pool);
  m.impl("max_pool_with_pos", &max_pool_with_pos);
  m.impl("max_pool_backward", &max_pool_backward);
  m.impl("avg_pool", &avg_pool);
  m.impl("avg_pool_backward", &avg_pool_backward);
  m.impl("global_max_pool", &global_max_pool);
  m.impl("global_max_pool_with_pos", &global_max_pool_with_pos);
  m.impl("global_max_pool_backward", &global_max_pool_backward);
  m.impl("global_avg_pool", &global_avg_pool);
  m.impl("global_avg_pool_backward", &global_avg_pool_backward);
}

}  // namespace torchpool
