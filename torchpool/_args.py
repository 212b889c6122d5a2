"""The one place where user arguments become explicit per-dimension values.

Every check here raises one error that names the function, the argument, the value received and
the rule. The output-size rule is torch's and matches ``csrc/geometry.h``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

IntOrTuple = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DIM_NAMES = {1: "L", 2: "H, W", 3: "D, H, W"}


def fmt(values: Sequence[int]) -> str:
    """Formats a tuple like Python does: (2,) or (2, 3)."""
    return str(tuple(values))


class Geometry(NamedTuple):
    """Explicit per-dimension pooling arguments, as the ops take them."""

    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    pad_before: Tuple[int, ...]
    pad_after: Tuple[int, ...]
    dilation: Tuple[int, ...]
    ceil_mode: bool


def expand(fn: str, name: str, value: IntOrTuple, nd: int) -> Tuple[int, ...]:
    """An int or a tuple of ``nd`` ints -> a tuple of ``nd`` ints."""
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int or a tuple of {nd} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * nd
    if isinstance(value, torch.SymInt):
        return (value,) * nd
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) == 1 and nd > 1:
            value = tuple(value) * nd
        if len(value) != nd or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{fn}: {name} must be an int or a tuple of {nd} ints, got {tuple(value)!r}")
        return tuple(value)
    raise TypeError(f"{fn}: {name} must be an int or a tuple of {nd} ints, got {value!r}")


def check_input(fn: str, input: torch.Tensor, nd: int) -> bool:
    """Checks dtype and rank; returns whether the input is batched."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    names = _DIM_NAMES[nd]
    if input.dim() not in (nd + 1, nd + 2):
        raise ValueError(
            f"{fn}: expected a {nd + 1}d (C, {names}) or {nd + 2}d (N, C, {names}) input, "
            f"got shape {fmt(input.shape)}")
    batched = input.dim() == nd + 2
    first = 1 if batched else 0
    if any(s == 0 for s in input.shape[first:]):
        raise ValueError(
            f"{fn}: input of shape {fmt(input.shape)} has a zero-size dim; only the batch dim may be 0")
    return batched


def output_size(size: int, k: int, s: int, pb: int, pa: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling output size; in ceil mode the last window must start inside the input
    or the left padding."""
    num = size + pb + pa - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and out > 0 and (out - 1) * s >= size + pb:
        out -= 1
    return out


def same_padding(size: int, k: int, s: int) -> Tuple[int, int]:
    """TensorFlow/Keras 'same': output ceil(size / s), the extra cell of an odd total after."""
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


# Geometries already validated, by (fn, spatial shape, arguments): a model calls its pools with
# the same arguments on inputs of the same shape step after step, and working the geometry out
# again costs about as much as the op call on a small input. Only plain ints, tuples or lists of
# ints, strings and None are keys (True == 1 and 2.0 == 2 as dict keys, but not as arguments);
# failures are never stored, so every bad call raises again. Under torch.compile the geometry is
# worked out while tracing, once per graph, without the cache.
_GEOMETRIES: dict = {}
_GEOMETRIES_CAP = 4096
_UNCACHED = object()


def _key(value):
    """`value` as a cache key no differently-handled argument shares, or _UNCACHED."""
    t = type(value)
    if t is int or t is str or value is None:
        return value
    if (t is tuple or t is list or t is torch.Size) and all(type(v) is int for v in value):
        return tuple(value),  # a 1-tuple: never equal to an int or a string key
    return _UNCACHED


def geometry(fn: str, input_shape: Sequence[int], nd: int, kernel_size: IntOrTuple,
             stride: Optional[IntOrTuple], padding: Padding, dilation: IntOrTuple,
             ceil_mode: bool) -> Geometry:
    """Validates pooling arguments against the input's shape and makes them explicit."""
    spatial = tuple(input_shape[-nd:])
    if not torch.compiler.is_compiling():  # traced once per graph; the cache is for eager calls
        key = (fn, spatial, _key(kernel_size), _key(stride), _key(padding), _key(dilation),
               ceil_mode if type(ceil_mode) is bool else _UNCACHED)
        if _UNCACHED not in key and all(type(n) is int for n in spatial):
            g = _GEOMETRIES.get(key)
            if g is None:
                g = _geometry(fn, input_shape, spatial, nd, kernel_size, stride, padding,
                              dilation, ceil_mode)
                if len(_GEOMETRIES) >= _GEOMETRIES_CAP:
                    _GEOMETRIES.clear()
                _GEOMETRIES[key] = g
            return g
    return _geometry(fn, input_shape, spatial, nd, kernel_size, stride, padding, dilation,
                     ceil_mode)


def _geometry(fn, input_shape, spatial, nd, kernel_size, stride, padding, dilation, ceil_mode):
    kernel = expand(fn, "kernel_size", kernel_size, nd)
    no_stride = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
    strides = kernel if no_stride else expand(fn, "stride", stride, nd)
    dil = expand(fn, "dilation", dilation, nd)
    if any(k <= 0 for k in kernel):
        raise ValueError(f"{fn}: kernel_size must be positive, got {fmt(kernel)}")
    if any(s <= 0 for s in strides):
        raise ValueError(f"{fn}: stride must be positive, got {fmt(strides)}")
    if any(d <= 0 for d in dil):
        raise ValueError(f"{fn}: dilation must be positive, got {fmt(dil)}")
    if isinstance(padding, str):
        if padding == "valid":
            before = after = (0,) * nd
        elif padding == "same":
            if any(d != 1 for d in dil):
                raise ValueError(
                    f"{fn}: padding='same' supports only dilation 1, got dilation {fmt(dil)}")
            pads = [same_padding(n, k, s) for n, k, s in zip(spatial, kernel, strides)]
            before = tuple(p[0] for p in pads)
            after = tuple(p[1] for p in pads)
        else:
            raise ValueError(
                f"{fn}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        before = after = expand(fn, "padding", padding, nd)
        if any(p < 0 for p in before):
            raise ValueError(f"{fn}: padding must be non-negative, got {fmt(before)}")
        if any(p > k // 2 for p, k in zip(before, kernel)):
            raise ValueError(
                f"{fn}: padding {fmt(before)} must be at most half of kernel_size {fmt(kernel)}")
    ceil_mode = bool(ceil_mode)
    outs = tuple(output_size(n, k, s, pb, pa, d, ceil_mode)
                 for n, k, s, pb, pa, d in zip(spatial, kernel, strides, before, after, dil))
    if any(o < 1 for o in outs):
        dilated = f" and dilation {fmt(dil)}" if any(d != 1 for d in dil) else ""
        raise ValueError(
            f"{fn}: input of shape {fmt(input_shape)} is too small for kernel_size {fmt(kernel)} "
            f"with padding {fmt(before)}{dilated}: output would be {fmt(outs)}")
    return Geometry(kernel, strides, before, after, dil, ceil_mode)


def output_shape(input_shape: Sequence[int], g: Geometry) -> Tuple[int, ...]:
    """Full output shape (N, C, *out) for a batched input shape."""
    nd = len(g.kernel_size)
    spatial = input_shape[-nd:]
    outs = tuple(output_size(n, k, s, pb, pa, d, g.ceil_mode)
                 for n, k, s, pb, pa, d in zip(spatial, g.kernel_size, g.stride, g.pad_before,
                                               g.pad_after, g.dilation))
    return tuple(input_shape[:2]) + outs


def window_cells(kernel_size: Sequence[int]) -> int:
    return math.prod(kernel_size)


def position_dtype(kernel_size: Sequence[int]) -> torch.dtype:
    """Saved window positions take one byte while the window has at most 256 cells."""
    return torch.uint8 if window_cells(kernel_size) <= 256 else torch.int32


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels work in and write (same rule as ``layout_of`` in csrc/common.h)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def check_divisor(fn: str, divisor_override: Optional[int]) -> Optional[int]:
    if divisor_override is None:
        return None
    if isinstance(divisor_override, bool) or not isinstance(divisor_override, int):
        raise TypeError(f"{fn}: divisor_override must be an int or None, got {divisor_override!r}")
    if divisor_override == 0:
        raise ValueError(f"{fn}: divisor_override must be non-zero")
    return divisor_override
