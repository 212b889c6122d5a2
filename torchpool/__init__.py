"""torchpool: hand-written CPU and CUDA kernels for max, average and global pooling.

    import torchpool
    y = torchpool.functional.max_pool2d(x, 2)          # like torch.nn.functional
    layer = torchpool.nn.MaxPool2d(2, padding="same")  # like torch.nn, plus Keras padding
"""
import torch

# The compiled library registers the ops (torch.ops.torchpool.*); it must load before the fake
# kernels are registered against them.
from . import _C  # noqa: F401
from . import _fake  # noqa: F401
from . import autograd, functional, nn

__version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether this build has the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchpool::max_pool", "CUDA")


__all__ = ["autograd", "functional", "nn", "cuda_built", "__version__"]
