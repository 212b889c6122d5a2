"""torch.nn.functional-style pooling: max_pool{1,2,3}d, avg_pool{1,2,3}d,
global_max_pool{1,2,3}d and global_avg_pool{1,2,3}d.

Same signatures and results as torch.nn.functional where torch defines them; ``padding`` also
takes 'valid' and 'same' (TensorFlow/Keras rule). Training (an input that requires grad) saves a
one-byte window position per output for max pooling; inference saves nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _args
from . import autograd as _autograd

ops = torch.ops.torchpool

__all__ = [f"{kind}_pool{nd}d" for kind in ("max", "avg", "global_max", "global_avg")
           for nd in (1, 2, 3)]


def _batched(fn: str, input: torch.Tensor, nd: int):
    """(input as (N, C, *spatial), whether the caller's input was batched)."""
    batched = _args.check_input(fn, input, nd)
    return (input if batched else input.unsqueeze(0)), batched


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# The ops are differentiable as they are: their autograd is registered in C++ (csrc/autograd.cpp).
# torch.func refuses autograd written in C++, so under its transforms a pool that needs a gradient
# takes the Python Functions of torchpool/autograd.py instead.
_functorch_active = torch._C._are_functorch_transforms_active


def _python_autograd(x: torch.Tensor) -> bool:
    return _needs_grad(x) and _functorch_active()


# Calls already made, per pool function: a model calls its pools with the same arguments on inputs
# of the same shape step after step. A call found here goes straight to the op (differentiable
# itself) in a few Python steps: in a model the caches are cold when a pool is called, and each
# step then costs about a microsecond (NOTES §100). The key holds the input's shape and dtype, the
# arguments and their types (True == 1 and 2.0 == 2 as keys). Only calls the general path has
# accepted are stored, and only those with a plain tensor of the ops' rank (batched) with no empty
# dim and arguments of types whose equal values behave alike (int, bool, None, str; not tuples,
# which hold such values unseen): a later call with an equal key is then as valid and has the same
# geometry. Never used while torch.compile traces.
_KNOWN_CAP = 256
_KNOWN_TYPES = (int, bool, type(None), str)


def _lookup(known: dict, input, *args):
    """(the call's key, or None where it has none; what `known` holds for it, or None)."""
    if type(input) is not torch.Tensor or torch.compiler.is_compiling():
        return None, None
    key = (input.shape, input.dtype, *args, *map(type, args))
    try:
        return key, known.get(key)
    except TypeError:  # an unhashable argument (a list): never stored
        return None, None


def _storable(input, rank: int, key: tuple) -> bool:
    n = (len(key) - 2) // 2
    return (input.dim() == rank and input.numel() != 0 and input.dtype in _args.FLOAT_DTYPES
            and all(t in _KNOWN_TYPES for t in key[2 + n:]))


def _store(known: dict, key: tuple, value) -> None:
    if len(known) >= _KNOWN_CAP:
        known.clear()
    known[key] = value


def _max_pool(fn, nd, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    x, batched = _batched(fn, input, nd)
    g = _args.geometry(fn, input.shape, nd, kernel_size, stride, padding, dilation, ceil_mode)
    pos = None
    if _python_autograd(x):
        out, pos = _autograd.MaxPool.apply(x, g)
    elif return_indices:
        out, pos = ops.max_pool_with_pos(x, *g)
    else:
        out = ops.max_pool(x, *g)
    if not return_indices:
        return out if batched else out.squeeze(0)
    indices = ops.max_pool_indices(pos, x.shape, *g, check_pos=False)  # the forward's own
    if not batched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return out, indices


def _avg_args(fn, nd, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override):
    """(the AvgPool Function's arguments after the input, the avg_pool op's), validated."""
    g = _args.geometry(fn, input.shape, nd, kernel_size, stride, padding, 1, ceil_mode)
    divisor_override = _args.check_divisor(fn, divisor_override)
    # String padding never counts padded cells.
    cip = bool(count_include_pad) and not isinstance(padding, str)
    return (g, cip, divisor_override), (*g[:4], g.ceil_mode, cip, divisor_override)


def _avg_pool(fn, nd, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override):
    x, batched = _batched(fn, input, nd)
    function_args, op_args = _avg_args(fn, nd, input, kernel_size, stride, padding, ceil_mode,
                                       count_include_pad, divisor_override)
    if _python_autograd(x):
        out = _autograd.AvgPool.apply(x, *function_args)
    else:
        out = ops.avg_pool(x, *op_args)
    return out if batched else out.squeeze(0)


def _global_pool(fn, nd, kind, input, keepdim):
    x, batched = _batched(fn, input, nd)
    if _python_autograd(x):
        out = (_autograd.GlobalMaxPool.apply(x)[0] if kind == "max" else
               _autograd.GlobalAvgPool.apply(x))
    else:
        out = (ops.global_max_pool if kind == "max" else ops.global_avg_pool)(x)
    if keepdim:
        out = out.reshape(tuple(out.shape) + (1,) * nd)
    return out if batched else out.squeeze(0)


def _make_max(nd: int):
    fn = f"max_pool{nd}d"
    rank, known = nd + 2, {}
    plain = ops.max_pool.default

    def max_pool(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode: bool = False, return_indices: bool = False):
        key, g = _lookup(known, input, kernel_size, stride, padding, dilation, ceil_mode)
        if g is not None and not return_indices and not _functorch_active():
            return plain(input, *g)
        out = _max_pool(fn, nd, input, kernel_size, stride, padding, dilation, ceil_mode,
                        return_indices)
        if key is not None and _storable(input, rank, key):
            _store(known, key, _args.geometry(fn, input.shape, nd, kernel_size, stride, padding,
                                              dilation, ceil_mode))
        return out

    max_pool.__name__ = max_pool.__qualname__ = fn
    max_pool.__doc__ = (
        f"{nd}d max pooling, as ``torch.nn.functional.{fn}``.\n\n"
        "``padding`` is an int, a tuple, 'valid' or 'same'. With ``return_indices=True`` also\n"
        "returns torch-compatible int64 indices (accepted by ``max_unpool``).")
    return max_pool


def _make_avg(nd: int):
    fn = f"avg_pool{nd}d"
    rank, known = nd + 2, {}
    plain = ops.avg_pool.default

    def avg_pool(input: torch.Tensor, kernel_size, stride=None, padding=0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: Optional[int] = None):
        key, args = _lookup(known, input, kernel_size, stride, padding, ceil_mode,
                            count_include_pad, divisor_override)
        if args is not None and not _functorch_active():
            return plain(input, *args)
        out = _avg_pool(fn, nd, input, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override)
        if key is not None and _storable(input, rank, key):
            _store(known, key, _avg_args(fn, nd, input, kernel_size, stride, padding, ceil_mode,
                                         count_include_pad, divisor_override)[1])
        return out

    avg_pool.__name__ = avg_pool.__qualname__ = fn
    avg_pool.__doc__ = (
        f"{nd}d average pooling, as ``torch.nn.functional.{fn}``.\n\n"
        "``padding`` is an int, a tuple, 'valid' or 'same'; with a string padding the padded\n"
        "cells are never counted (Keras's rule).")
    return avg_pool


def _make_global(nd: int, kind: str):
    fn = f"global_{kind}_pool{nd}d"
    rank, dtypes = nd + 2, _args.FLOAT_DTYPES
    plain = (ops.global_max_pool if kind == "max" else ops.global_avg_pool).default

    def global_pool(input: torch.Tensor, keepdim: bool = False):
        # The common call (a plain batched tensor with no empty dim) in as few Python steps as
        # possible: in a model the caches are cold when a pool is called, and each step then costs
        # about a microsecond (NOTES §100). Everything else takes the general path.
        if (type(input) is torch.Tensor and not keepdim and input.dim() == rank
                and input.dtype in dtypes and input.numel() != 0 and not _functorch_active()):
            return plain(input)
        return _global_pool(fn, nd, kind, input, keepdim)

    global_pool.__name__ = global_pool.__qualname__ = fn
    global_pool.__doc__ = (
        f"Global {kind} pooling over the {nd} spatial dims: (N, C, *spatial) -> (N, C),\n"
        "or (N, C, 1, ...) with ``keepdim=True``; unbatched (C, *spatial) -> (C,).")
    return global_pool


max_pool1d, max_pool2d, max_pool3d = (_make_max(nd) for nd in (1, 2, 3))
avg_pool1d, avg_pool2d, avg_pool3d = (_make_avg(nd) for nd in (1, 2, 3))
global_max_pool1d, global_max_pool2d, global_max_pool3d = (_make_global(nd, "max") for nd in (1, 2, 3))
global_avg_pool1d, global_avg_pool2d, global_avg_pool3d = (_make_global(nd, "avg") for nd in (1, 2, 3))
