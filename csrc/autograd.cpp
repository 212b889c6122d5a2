// Autograd of the global pools, registered in C++ for every device.
//
// The global pools reduce a whole plane per output, so a call is short next to the Python steps
// around it when the caches are cold (as in a model, where each pool follows a layer that swept
// them): a Python autograd.Function cost 20-60 us more per training forward than an autograd node
// built here (benchmarks/NOTES.md 101). The window pools keep their Functions in
// torchpool/autograd.py.
//
// Each kernel builds a node only when grad mode is on and an input requires grad; otherwise it
// calls the device kernel straight away. The backward ops are differentiable too (double
// backward): a global max backward is linear in grad_output and its derivative is a gather at the
// saved cells; a global average's backward is undone by the forward pool.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace torchpool {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A typed handle to one of the ops, found once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto& global_max_pool_op() {
  static const auto h = op<at::Tensor(const at::Tensor&)>("torchpool::global_max_pool");
  return h;
}
const auto& global_max_pool_with_pos_op() {
  static const auto h =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("torchpool::global_max_pool_with_pos");
  return h;
}
const auto& global_max_pool_backward_op() {
  static const auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef, bool)>(
          "torchpool::global_max_pool_backward");
  return h;
}
const auto& global_avg_pool_op() {
  static const auto h = op<at::Tensor(const at::Tensor&)>("torchpool::global_avg_pool");
  return h;
}
const auto& global_avg_pool_backward_op() {
  static const auto h = op<at::Tensor(const at::Tensor&, c10::IntArrayRef, bool)>(
      "torchpool::global_avg_pool_backward");
  return h;
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

// (N, C, *spatial) -> (N, C); the gradient goes to the first maximum of each plane.
struct GlobalMaxPool : torch::autograd::Function<GlobalMaxPool> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& self) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, pos] = global_max_pool_with_pos_op().call(self);
    save_input(ctx, self);
    ctx->save_for_backward({pos});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto pos = ctx->get_saved_variables()[0];
    return {global_max_pool_backward_op().call(grads[0], pos, input_size(ctx), channels_last(ctx))};
  }
};

struct GlobalMaxPoolBackward : torch::autograd::Function<GlobalMaxPoolBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& pos,
                            c10::IntArrayRef size, bool cl) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({pos});
    return global_max_pool_backward_op().call(grad, pos, size, cl);
  }

  // d(grad_input)/d(grad_output) picks each plane's saved cell.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto pos = ctx->get_saved_variables()[0];
    const auto planes = grads[0].reshape({pos.size(0), pos.size(1), -1});
    return {planes.gather(2, pos.unsqueeze(-1)).squeeze(-1), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// (N, C, *spatial) -> (N, C); the gradient is spread evenly over each plane.
struct GlobalAvgPool : torch::autograd::Function<GlobalAvgPool> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& self) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_input(ctx, self);
    return global_avg_pool_op().call(self);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {global_avg_pool_backward_op().call(grads[0], input_size(ctx), channels_last(ctx))};
  }
};

struct GlobalAvgPoolBackward : torch::autograd::Function<GlobalAvgPoolBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, c10::IntArrayRef size,
                            bool cl) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return global_avg_pool_backward_op().call(grad, size, cl);
  }

  // The backward spreads g / count over each plane; its adjoint averages each plane.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {global_avg_pool_op().call(grads[0]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor global_max_pool(const at::Tensor& self) {
  if (builds_graph(self)) {
    return GlobalMaxPool::apply(self);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return global_max_pool_op().call(self);
}

at::Tensor global_max_pool_backward(const at::Tensor& grad, const at::Tensor& pos,
                                    c10::IntArrayRef size, bool cl) {
  if (builds_graph(grad)) {
    return GlobalMaxPoolBackward::apply(grad, pos, size, cl);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return global_max_pool_backward_op().call(grad, pos, size, cl);
}

at::Tensor global_avg_pool(const at::Tensor& self) {
  if (builds_graph(self)) {
    return GlobalAvgPool::apply(self);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return global_avg_pool_op().call(self);
}

at::Tensor global_avg_pool_backward(const at::Tensor& grad, c10::IntArrayRef size, bool cl) {
  if (builds_graph(grad)) {
    return GlobalAvgPoolBackward::apply(grad, size, cl);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return global_avg_pool_backward_op().call(grad, size, cl);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchpool, Autograd, m) {
  m.impl("global_max_pool", &global_max_pool);
  m.impl("global_max_pool_backward", &global_max_pool_backward);
  m.impl("global_avg_pool", &global_avg_pool);
  m.impl("global_avg_pool_backward", &global_avg_pool_backward);
}

}  // namespace torchpool
