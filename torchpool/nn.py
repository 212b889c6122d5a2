"""nn.Module pooling layers, drop-in replacements for torch.nn's (plus 'same'/'valid' padding)
and global pooling layers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F

__all__ = [f"{kind}Pool{nd}d" for kind in ("Max", "Avg", "GlobalMax", "GlobalAvg")
           for nd in (1, 2, 3)]


def _as_given(value, nd):
    """torch.nn keeps 2d/3d arguments as given and turns 1d ones into 1-tuples."""
    if nd == 1 and isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return value


class _MaxPoolNd(nn.Module):
    _nd = 0
    __constants__ = ["kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"]

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def forward(self, input: torch.Tensor):
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self._nd - 1]
        return pool(input, self.kernel_size, self.stride, self.padding, self.dilation,
                    ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class _AvgPoolNd(nn.Module):
    _nd = 0
    __constants__ = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override"]

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: Optional[int] = None) -> None:
        super().__init__()
        nd = self._nd
        self.kernel_size = _as_given(kernel_size, nd)
        self.stride = _as_given(stride if stride is not None else kernel_size, nd)
        self.padding = _as_given(padding, nd)
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self._nd - 1]
        return pool(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                    self.count_include_pad, self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class _GlobalPoolNd(nn.Module):
    _nd = 0
    _kind = ""
    __constants__ = ["keepdim"]

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pool = getattr(F, f"global_{self._kind}_pool{self._nd}d")
        return pool(input, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"keepdim={self.keepdim}"


def _layer(base, name: str, nd: int, doc: str, **attrs):
    cls = type(name, (base,), {"_nd": nd, "__doc__": doc, "__module__": __name__, **attrs})
    return cls


MaxPool1d, MaxPool2d, MaxPool3d = (
    _layer(_MaxPoolNd, f"MaxPool{nd}d", nd,
           f"{nd}d max pooling, as ``torch.nn.MaxPool{nd}d`` (padding may be 'same'/'valid').")
    for nd in (1, 2, 3))
AvgPool1d, AvgPool2d, AvgPool3d = (
    _layer(_AvgPoolNd, f"AvgPool{nd}d", nd,
           f"{nd}d average pooling, as ``torch.nn.AvgPool{nd}d`` (padding may be 'same'/'valid').")
    for nd in (1, 2, 3))
GlobalMaxPool1d, GlobalMaxPool2d, GlobalMaxPool3d = (
    _layer(_GlobalPoolNd, f"GlobalMaxPool{nd}d", nd,
           f"Global max over {nd} spatial dims: (N, C, *spatial) -> (N, C).", _kind="max")
    for nd in (1, 2, 3))
GlobalAvgPool1d, GlobalAvgPool2d, GlobalAvgPool3d = (
    _layer(_GlobalPoolNd, f"GlobalAvgPool{nd}d", nd,
           f"Global average over {nd} spatial dims: (N, C, *spatial) -> (N, C).", _kind="avg")
    for nd in (1, 2, 3))
