"""autograd.Function wrappers: forward and backward both call the registered ops.

The inputs here are batched (N, C, *spatial) and the geometry explicit; torchpool.functional
does the argument handling. Backward produces the gradient in the input's layout.
"""
from __future__ import annotations

import torch

from . import _args

ops = torch.ops.torchpool


def _in_layout(grad_input: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """The backward ops take their layout from grad_output, which cannot tell channels_last from
    contiguous when the output has a single channel or a single spatial cell; then the gradient
    is converted to the input's layout here (a no-op otherwise)."""
    return grad_input.contiguous(memory_format=layout)


class MaxPool(torch.autograd.Function):
    """Max pool that saves the 1-byte window position of each maximum for backward.

    Returns (output, pos); pos is non-differentiable and also feeds ``return_indices``.
    """

    @staticmethod
    def forward(input, g: _args.Geometry):
        return ops.max_pool_with_pos(input, *g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, g = inputs
        ctx.g = g
        ctx.input_shape = tuple(input.shape)
        ctx.layout = _args.layout_of(input)
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_pos):
        (pos,) = ctx.saved_tensors
        grad = grad_output.contiguous(memory_format=ctx.layout)
        grad_input = ops.max_pool_backward(grad, pos, ctx.input_shape, *ctx.g)
        return _in_layout(grad_input, ctx.layout), None


class AvgPool(torch.autograd.Function):
    """Average pool; saves nothing but shapes."""

    @staticmethod
    def forward(input, g: _args.Geometry, count_include_pad: bool, divisor_override):
        return ops.avg_pool(input, g.kernel_size, g.stride, g.pad_before, g.pad_after,
                            g.ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, g, count_include_pad, divisor_override = inputs
        ctx.args = (tuple(input.shape), g.kernel_size, g.stride, g.pad_before, g.pad_after,
                    g.ceil_mode, count_include_pad, divisor_override)
        ctx.layout = _args.layout_of(input)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous(memory_format=ctx.layout)
        return _in_layout(ops.avg_pool_backward(grad, *ctx.args), ctx.layout), None, None, None


class GlobalMaxPool(torch.autograd.Function):
    """(N, C, *spatial) -> (N, C); backward sends the gradient to the first maximum."""

    @staticmethod
    def forward(input):
        return ops.global_max_pool_with_pos(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input,) = inputs
        ctx.input_shape = tuple(input.shape)
        ctx.channels_last = _args.layout_of(input) != torch.contiguous_format
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_pos):
        (pos,) = ctx.saved_tensors
        return ops.global_max_pool_backward(grad_output, pos, ctx.input_shape, ctx.channels_last)


class GlobalAvgPool(torch.autograd.Function):
    """(N, C, *spatial) -> (N, C); backward spreads grad / count."""

    @staticmethod
    def forward(input):
        return ops.global_avg_pool(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input,) = inputs
        ctx.input_shape = tuple(input.shape)
        ctx.channels_last = _args.layout_of(input) != torch.contiguous_format

    @staticmethod
    def backward(ctx, grad_output):
        return ops.global_avg_pool_backward(grad_output, ctx.input_shape, ctx.channels_last)
