"""Fake (meta) kernels: output shapes, dtypes and layouts only, so torch.compile and other tracers
see through every op without running it. The rules mirror csrc/geometry.h and csrc/common.h."""
from __future__ import annotations

import torch

from . import _args


def _empty(shape, like: torch.Tensor, fmt, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _geometry(kernel_size, stride, pad_before, pad_after, dilation, ceil_mode) -> _args.Geometry:
    return _args.Geometry(tuple(kernel_size), tuple(stride), tuple(pad_before), tuple(pad_after),
                          tuple(dilation), bool(ceil_mode))


@torch.library.register_fake("torchpool::max_pool")
def _max_pool(self, kernel_size, stride, pad_before, pad_after, dilation, ceil_mode):
    g = _geometry(kernel_size, stride, pad_before, pad_after, dilation, ceil_mode)
    return _empty(_args.output_shape(self.shape, g), self, _args.layout_of(self))


@torch.library.register_fake("torchpool::max_pool_with_pos")
def _max_pool_with_pos(self, kernel_size, stride, pad_before, pad_after, dilation, ceil_mode):
    g = _geometry(kernel_size, stride, pad_before, pad_after, dilation, ceil_mode)
    shape, fmt = _args.output_shape(self.shape, g), _args.layout_of(self)
    return (_empty(shape, self, fmt),
            _empty(shape, self, fmt, dtype=_args.position_dtype(kernel_size)))


def _requested_layout(input_size, channels_last):
    """The layout a backward told `channels_last` writes grad_input in."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if len(input_size) == 5 else torch.channels_last


def _backward_layout(grad_output, input_size, channels_last):
    """csrc/common.h's backward_layout: as asked, else grad_output's."""
    if channels_last is None:
        return _args.layout_of(grad_output)
    return _requested_layout(input_size, channels_last)


@torch.library.register_fake("torchpool::max_pool_backward")
def _max_pool_backward(grad_output, pos, input_size, kernel_size, stride, pad_before, pad_after,
                       dilation, ceil_mode, channels_last=None, *, check_pos=True):
    return _empty(input_size, grad_output, _backward_layout(grad_output, input_size, channels_last))


@torch.library.register_fake("torchpool::max_pool_indices")
def _max_pool_indices(pos, input_size, kernel_size, stride, pad_before, pad_after, dilation,
                      ceil_mode, *, check_pos=True):
    return _empty(pos.shape, pos, _args.layout_of(pos), dtype=torch.int64)


@torch.library.register_fake("torchpool::avg_pool")
def _avg_pool(self, kernel_size, stride, pad_before, pad_after, ceil_mode, count_include_pad,
              divisor_override):
    g = _geometry(kernel_size, stride, pad_before, pad_after, (1,) * len(kernel_size), ceil_mode)
    return _empty(_args.output_shape(self.shape, g), self, _args.layout_of(self))


@torch.library.register_fake("torchpool::avg_pool_backward")
def _avg_pool_backward(grad_output, input_size, kernel_size, stride, pad_before, pad_after,
                       ceil_mode, count_include_pad, divisor_override, channels_last=None):
    return _empty(input_size, grad_output, _backward_layout(grad_output, input_size, channels_last))


def _global(self):
    return self.new_empty(self.shape[:2])


torch.library.register_fake("torchpool::global_max_pool")(_global)
torch.library.register_fake("torchpool::global_avg_pool")(_global)


def _global_position_dtype(self):
    """csrc/common.h's global_position_dtype on the CPU (the narrowest dtype that holds every cell
    of a plane: uint8 up to 256 cells); the CUDA kernels write int64."""
    if self.device.type != "cpu":
        return torch.int64
    cells = 1
    for s in self.shape[2:]:
        cells = cells * s
    return torch.uint8 if cells <= 256 else torch.int32 if cells <= 2**31 - 1 else torch.int64


@torch.library.register_fake("torchpool::global_max_pool_with_pos")
def _global_max_pool_with_pos(self):
    return _global(self), self.new_empty(self.shape[:2], dtype=_global_position_dtype(self))


@torch.library.register_fake("torchpool::global_max_pool_backward")
def _global_max_pool_backward(grad_output, pos, input_size, channels_last, *, check_pos=True):
    return _empty(input_size, grad_output, _requested_layout(input_size, channels_last))


@torch.library.register_fake("torchpool::global_avg_pool_backward")
def _global_avg_pool_backward(grad_output, input_size, channels_last):
    return _empty(input_size, grad_output, _requested_layout(input_size, channels_last))
