"""Float input gradients of 32 MiB or more: the CPU window backwards stage them in cache and write
them out with non-temporal stores. Each kernel that does so is compared with torch here, at sizes
whose rows and planes neither start nor end on cache-line boundaries; bfloat16 at the same sizes
(written as before) too."""
import pytest
import torch
import torch.nn.functional as F

import torchpool.functional as tpf
from conftest import assert_close, make_input, ref_dtype, run_fwd_bwd, to_layout

MIB = 2**20

# (id, ours, torch's, shape, dtype, layout, kwargs, exact)
CASES = [
    # windows that tile the input (write_tiles)
    ("tiles", tpf.max_pool2d, F.max_pool2d, (8, 128, 97, 95), torch.float32, "contiguous",
     dict(kernel_size=2), True),
    ("tiles-bf16", tpf.max_pool2d, F.max_pool2d, (16, 128, 97, 95), torch.bfloat16, "contiguous",
     dict(kernel_size=2), True),
    ("tiles-3d", tpf.max_pool3d, F.max_pool3d, (2, 64, 15, 63, 75), torch.float32, "contiguous",
     dict(kernel_size=2), True),
    ("tiles-avg", tpf.avg_pool2d, F.avg_pool2d, (8, 128, 97, 95), torch.float32, "contiguous",
     dict(kernel_size=2), False),
    # planes over 512 KiB: not staged, written in place
    ("tiles-big-planes", tpf.max_pool2d, F.max_pool2d, (2, 4, 1024, 1100), torch.float32, "contiguous",
     dict(kernel_size=2), True),
    # overlapping windows, row by row (the fused backward), 2d and 1d, odd widths
    ("fused", tpf.max_pool2d, F.max_pool2d, (8, 128, 97, 95), torch.float32, "contiguous",
     dict(kernel_size=3, stride=2, padding=1), False),
    ("fused-1d", tpf.max_pool1d, F.max_pool1d, (8, 256, 4611), torch.float32, "contiguous",
     dict(kernel_size=3, stride=2), False),
    ("fused-bf16", tpf.max_pool2d, F.max_pool2d, (16, 128, 97, 95), torch.bfloat16, "contiguous",
     dict(kernel_size=3, stride=2, padding=1), False),
    # channels-last, row by row
    ("channels-last", tpf.max_pool2d, F.max_pool2d, (8, 128, 96, 97), torch.float32, "channels_last",
     dict(kernel_size=3, stride=2, padding=1), False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_large_input_gradient(case):
    _, ours, theirs, shape, dtype, layout, kwargs, exact = case
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    x = to_layout(make_input(shape, dtype, gen=gen), layout)
    assert x.numel() * x.element_size() >= 32 * MIB  # the size from which the gradient is streamed
    y, gx, g = run_fwd_bwd(lambda t: ours(t, **kwargs), x, gen=gen)
    rd = ref_dtype(dtype)
    y_ref, gx_ref, _ = run_fwd_bwd(lambda t: theirs(t, **kwargs), x.to(rd), g.to(rd))
    assert_close(y, y_ref.to(dtype), dtype, exact=exact)
    assert_close(gx, gx_ref.to(dtype), dtype, exact=exact)
    assert gx.stride() == x.stride()
