"""Channels-last window-pool inputs of 16 MiB or more: there the CPU forwards prefetch, while one
output row is computed, the input rows that the next output row adds. Which rows those are depends
on the geometry, so each case here plans them differently: windows that share rows with the row
before (stride below the kernel), rows no window reads (stride above it), rows skipped inside the
window (dilation), the next depth slice (3d), and an image's one output row, the next row being
the next image's. Compared with torch in inference and in training (values, indices, gradient)."""
import pytest
import torch
import torch.nn.functional as F

import torchpool.functional as tpf
from conftest import assert_close, make_input, pool_outputs, run_fwd_bwd

MIB = 2**20

# (id, ours, torch's, shape, dtype, kwargs)
CASES = [
    ("overlapping-bfloat16", tpf.max_pool2d, F.max_pool2d, (8, 64, 130, 127), torch.bfloat16,
     dict(kernel_size=3, stride=2, padding=1)),
    ("stride-over-kernel", tpf.max_pool2d, F.max_pool2d, (4, 64, 130, 129), torch.float32,
     dict(kernel_size=2, stride=3)),
    ("dilated", tpf.max_pool2d, F.max_pool2d, (4, 64, 130, 129), torch.float32,
     dict(kernel_size=3, stride=1, dilation=2, padding=1)),
    ("one-row-per-image", tpf.max_pool2d, F.max_pool2d, (64, 32, 9, 512), torch.float32,
     dict(kernel_size=(9, 3), stride=(9, 2))),
    ("3d", tpf.max_pool3d, F.max_pool3d, (2, 32, 20, 60, 58), torch.float32,
     dict(kernel_size=3, stride=2, padding=1)),
    ("3d-avg-ceil", tpf.avg_pool3d, F.avg_pool3d, (2, 32, 21, 61, 57), torch.float32,
     dict(kernel_size=2, stride=2, ceil_mode=True, padding=1, count_include_pad=False)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_large_channels_last_input(case):
    name, ours, theirs, shape, dtype, kwargs = case
    gen = torch.Generator().manual_seed(shape[-1])
    fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = make_input(shape, dtype, gen=gen).contiguous(memory_format=fmt)
    assert x.numel() * x.element_size() >= 16 * MIB  # the size from which the rows are prefetched
    exact = "max" in ours.__name__
    with torch.no_grad():
        y = ours(x, **kwargs)
        y_ref = theirs(x.double(), **kwargs).to(dtype)
    assert_close(y, y_ref, dtype, exact=exact)
    assert y.is_contiguous(memory_format=fmt)

    out, gx, g = run_fwd_bwd(lambda t: pool_outputs(ours, t, **kwargs), x, gen=gen)
    out_ref, gx_ref, _ = run_fwd_bwd(lambda t: pool_outputs(theirs, t, **kwargs), x.double(), g.double())
    if isinstance(out, tuple):
        assert_close(out[0], out_ref[0].to(dtype), dtype, exact=True)
        assert torch.equal(out[1], out_ref[1])
    else:
        assert_close(out, out_ref.to(dtype), dtype)
    assert_close(gx, gx_ref.to(dtype), dtype)
