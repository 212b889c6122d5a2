"""The benchmark suite of DESIGN §5, as data.

Each case names a `torchpool.functional` op, its keyword arguments, the input shape (the GPU
shape; CPU runs divide N by `cpu_scale` so a run fits the machine) and the layouts to run. Its
torch eager equivalents are built here too: the first one is the reference for the correctness
check; the runner times all of them and compares against the fastest.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float64": torch.float64}
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
LAYOUTS = ("contiguous", "channels_last")
MODES = ("infer", "train_fwd", "bwd", "fwd_bwd")


@dataclass(frozen=True)
class Case:
    name: str
    op: str                        # function name in torchpool.functional / torch.nn.functional
    params: dict                   # keyword arguments of the op, besides the input
    shape: tuple                   # (N, C, *spatial) as listed in DESIGN §5
    layouts: tuple = ("contiguous",)
    cpu_scale: int = 1             # CPU runs use N // cpu_scale

    @property
    def ndim(self):
        return len(self.shape) - 2

    @property
    def is_global(self):
        return self.op.startswith("global_")

    @property
    def is_max(self):
        return "max" in self.op

    def shape_for(self, device, batch=None):
        """The shape a run on `device` times; `batch` overrides N."""
        n = self.shape[0] if device != "cpu" else max(1, self.shape[0] // self.cpu_scale)
        return (batch if batch is not None else n,) + tuple(self.shape[1:])

    def describe(self):
        kind = "max" if self.is_max else "avg"
        if self.is_global:
            return f"global {kind}"
        p = self.params
        k = p["kernel_size"]
        s = p.get("stride") or k
        parts = [kind, "×".join([str(k)] * self.ndim)]
        parts.append(f"s{s}")
        if p.get("padding"):
            parts.append(f"p{p['padding']}")
        if p.get("count_include_pad") is False:
            parts.append("excl-pad")
        return " ".join(parts)

    def torchpool_fn(self, functional):
        """The op bound to its parameters, from `functional` (torchpool.functional or a stand-in)."""
        fn = getattr(functional, self.op)
        params = dict(self.params)
        return lambda x: fn(x, **params)

    def torch_eager(self):
        """{label: fn} of torch eager equivalents; the first is the correctness reference."""
        d = self.ndim
        dims = tuple(range(2, 2 + d))
        if self.op == f"global_avg_pool{d}d":
            adaptive = getattr(F, f"adaptive_avg_pool{d}d")
            return {f"adaptive_avg_pool{d}d(1)": lambda x: adaptive(x, 1).flatten(1),
                    "mean": lambda x: x.mean(dims)}
        if self.op == f"global_max_pool{d}d":
            adaptive = getattr(F, f"adaptive_max_pool{d}d")
            # adaptive_max_pool sends the gradient to the first maximum, like torchpool; amax
            # splits it between ties, so it is timed but is not the reference.
            return {f"adaptive_max_pool{d}d(1)": lambda x: adaptive(x, 1).flatten(1),
                    "amax": lambda x: x.amax(dims)}
        fn = getattr(F, self.op)
        params = dict(self.params)
        return {f"F.{self.op}": lambda x: fn(x, **params)}


SUITE = (
    Case("mnist-pool", "max_pool2d", dict(kernel_size=2, stride=2), (256, 32, 26, 26)),
    Case("vgg-pool", "max_pool2d", dict(kernel_size=2, stride=2), (64, 128, 112, 112), cpu_scale=8),
    Case("resnet-stem", "max_pool2d", dict(kernel_size=3, stride=2, padding=1), (64, 64, 112, 112),
         layouts=LAYOUTS, cpu_scale=4),
    Case("inception-avg", "avg_pool2d", dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
         (64, 192, 35, 35), cpu_scale=2),
    Case("avg-2x2", "avg_pool2d", dict(kernel_size=2, stride=2), (64, 128, 56, 56), cpu_scale=2),
    Case("global-avg", "global_avg_pool2d", {}, (64, 2048, 7, 7), layouts=LAYOUTS),
    Case("global-max", "global_max_pool2d", {}, (64, 512, 14, 14)),
    Case("global-big-avg", "global_avg_pool2d", {}, (32, 64, 224, 224), cpu_scale=8),
    Case("global-big-max", "global_max_pool2d", {}, (32, 64, 224, 224), cpu_scale=8),
    Case("pool3d", "max_pool3d", dict(kernel_size=2, stride=2), (8, 64, 16, 56, 56)),
    Case("pool1d", "max_pool1d", dict(kernel_size=3, stride=2), (64, 256, 4096), cpu_scale=4),
)
CASES = {c.name: c for c in SUITE}


def memory_format(layout, ndim):
    if layout == "contiguous":
        return torch.contiguous_format
    if layout == "channels_last":
        return {2: torch.channels_last, 3: torch.channels_last_3d}[ndim]
    raise ValueError(f"unknown layout {layout!r}")
