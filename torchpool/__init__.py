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


def cpu_kernels() -> dict:
    """The CPU kernels picked for this machine: the instruction set (``"avx2"``, or ``"base"`` where
    the CPU lacks AVX2 and FMA or TORCHPOOL_CPU_ISA=base; TORCHPOOL_CPU_ISA=avx2 insists on AVX2)
    and the tuning of the AVX2 kernels for the CPU's vendor (``"intel"`` or ``"amd"``;
    TORCHPOOL_CPU_TUNE forces one)."""
    isa, tuning = torch.ops.torchpool.cpu_kernels()
    return dict(isa=isa, tuning=tuning)


def cpu_cache_stats() -> dict:
    """The cache of freed large CPU outputs (1 MiB and more), which later outputs of the same
    size reuse instead of mapping fresh pages: free bytes and blocks held, allocations served
    from it (hits) and mapped fresh (misses), and the cap on free bytes (TORCHPOOL_CPU_CACHE_MB,
    default 512; 0 turns the cache off)."""
    held, blocks, hits, misses, limit = torch.ops.torchpool.cpu_cache_stats()
    return dict(held_bytes=held, held_blocks=blocks, hits=hits, misses=misses, limit_bytes=limit)


def empty_cpu_cache() -> int:
    """Returns the free blocks of the CPU output cache to the system; returns their bytes. Tensors
    in use are unaffected."""
    return torch.ops.torchpool.empty_cpu_cache()


__all__ = ["autograd", "functional", "nn", "cuda_built", "cpu_kernels", "cpu_cache_stats", "empty_cpu_cache", "__version__"]
