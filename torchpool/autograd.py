"""autograd.Function wrappers: forward and backward both call the registered ops.

The ops are differentiable themselves (autograd registered in C++, csrc/autograd.cpp); these
Functions serve under functorch transforms (torch.func.grad, vjp), which refuse autograd written
in C++.

The inputs here are batched (N, C, *spatial) and the geometry explicit; torchpool.functional
does the argument handling. Backward produces the gradient in the input's layout.

Each backward is itself a Function, so gradients of gradients work (gradient penalties,
double backward): a pooling backward is linear in grad_output, and its own derivative is a
gather at the saved positions (max) or the forward pool again (average).
"""
from __future__ import annotations

import torch

from . import _args

ops = torch.ops.torchpool


def _channels_last(layout: torch.memory_format) -> bool:
    """The backward ops' channels_last for grad_input in `layout`: told, not taken from
    grad_output, which cannot tell channels_last from contiguous when the output has a single
    channel or a single spatial cell."""
    return layout != torch.contiguous_format


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[n, c, index[n, c, ...]] over the flattened spatial dims of `values`."""
    n, c = index.shape[:2]
    flat = index.reshape(n, c, -1)
    return values.reshape(n, c, -1).gather(2, flat).reshape(index.shape)


class MaxPool(torch.autograd.Function):
    """Max pool that saves the 1-byte window position of each maximum for backward.

    Returns (output, pos); pos is non-differentiable and also feeds ``return_indices``.
    """

    @staticmethod
    def forward(input, g: _args.Geometry):
        return ops.max_pool_with_pos.default(input, *g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, g = inputs
        ctx.g = g
        ctx.input_shape = input.shape
        ctx.layout = _args.layout_of(input)
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_pos):
        (pos,) = ctx.saved_tensors
        grad = grad_output.contiguous(memory_format=ctx.layout)
        return MaxPoolBackward.apply(grad, pos, ctx.input_shape, ctx.g, ctx.layout), None


class MaxPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad, pos, input_shape, g, layout):
        return ops.max_pool_backward.default(grad, pos, input_shape, *g, _channels_last(layout),
                                             check_pos=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, pos, input_shape, g, _ = inputs
        ctx.input_shape, ctx.g = input_shape, g
        ctx.save_for_backward(pos)

    @staticmethod
    def backward(ctx, grad_grad_input):
        (pos,) = ctx.saved_tensors
        index = ops.max_pool_indices(pos, ctx.input_shape, *ctx.g, check_pos=False)
        return _gather(grad_grad_input, index), None, None, None, None


class AvgPool(torch.autograd.Function):
    """Average pool; saves nothing but shapes."""

    @staticmethod
    def forward(input, g: _args.Geometry, count_include_pad: bool, divisor_override):
        return ops.avg_pool.default(input, g.kernel_size, g.stride, g.pad_before,
                                    g.pad_after, g.ceil_mode, count_include_pad,
                                    divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, *ctx.pool_args = inputs
        ctx.input_shape = input.shape
        ctx.layout = _args.layout_of(input)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous(memory_format=ctx.layout)
        grad_input = AvgPoolBackward.apply(grad, ctx.input_shape, ctx.layout, *ctx.pool_args)
        return grad_input, None, None, None


class AvgPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad, input_shape, layout, g, count_include_pad, divisor_override):
        return ops.avg_pool_backward.default(grad, input_shape, g.kernel_size, g.stride,
                                             g.pad_before, g.pad_after, g.ceil_mode,
                                             count_include_pad, divisor_override,
                                             _channels_last(layout))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, ctx.layout, *ctx.pool_args = inputs

    @staticmethod
    def backward(ctx, grad_grad_input):
        grad_grad = AvgPool.apply(grad_grad_input.contiguous(memory_format=ctx.layout),
                                  *ctx.pool_args)
        return grad_grad, None, None, None, None, None


class GlobalMaxPool(torch.autograd.Function):
    """(N, C, *spatial) -> (N, C); backward sends the gradient to the first maximum."""

    @staticmethod
    def forward(input):
        return ops.global_max_pool_with_pos.default(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape
        ctx.channels_last = _channels_last(_args.layout_of(inputs[0]))
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_pos):
        (pos,) = ctx.saved_tensors
        return GlobalMaxPoolBackward.apply(grad_output, pos, ctx.input_shape, ctx.channels_last)


class GlobalMaxPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad, pos, input_shape, channels_last):
        return ops.global_max_pool_backward.default(grad, pos, input_shape, channels_last,
                                                    check_pos=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_grad_input):
        (pos,) = ctx.saved_tensors
        # The cells are saved in the plane's narrowest dtype; gather takes int64.
        return _gather(grad_grad_input, pos.long().unsqueeze(-1)).squeeze(-1), None, None, None


class GlobalAvgPool(torch.autograd.Function):
    """(N, C, *spatial) -> (N, C); backward spreads grad / count."""

    @staticmethod
    def forward(input):
        return ops.global_avg_pool.default(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape
        ctx.channels_last = _channels_last(_args.layout_of(inputs[0]))

    @staticmethod
    def backward(ctx, grad_output):
        return GlobalAvgPoolBackward.apply(grad_output, ctx.input_shape, ctx.channels_last)


class GlobalAvgPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad, input_shape, channels_last):
        return ops.global_avg_pool_backward.default(grad, input_shape, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_grad_input):
        return GlobalAvgPool.apply(grad_grad_input), None, None
