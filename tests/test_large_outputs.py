"""Float window-pool outputs of 8 MiB or more: the CPU forwards that walk whole output rows (2-wide
windows at stride 2, 3-wide ones at stride 2, stride-1 square averages, channels-last windows)
stage them in cache and write them out with non-temporal stores (channels-last cells of whole
cache lines straight from the registers), and so does the stride-1 average's backward for its
input gradient. Each such kernel is compared with torch here, in inference and in training
(values, indices, gradients), at sizes whose rows and planes neither start nor end on cache-line
boundaries, into memory that held another result's nonzeros just before (the output blocks are
recycled)."""
import pytest
import torch
import torch.nn.functional as F

import torchpool.functional as tpf
from conftest import assert_close, make_input, pool_outputs, run_fwd_bwd

MIB = 2**20

# (id, ours, torch's, shape, kwargs, exact); the channels-last cases' ids start with it
CASES = [
    # 2-wide windows at stride 2: rows of 47 outputs (188 bytes), 4 KiB of them to a copy
    ("tiles-max", tpf.max_pool2d, F.max_pool2d, (8, 128, 97, 95), dict(kernel_size=2), True),
    ("tiles-avg", tpf.avg_pool2d, F.avg_pool2d, (8, 128, 98, 94), dict(kernel_size=2), False),
    ("tiles-3d", tpf.max_pool3d, F.max_pool3d, (2, 64, 30, 63, 75), dict(kernel_size=2), True),
    ("tiles-1d", tpf.max_pool1d, F.max_pool1d, (8, 256, 2051), dict(kernel_size=2), True),
    # 3-wide windows at stride 2: 2d with padding; 1d rows of 9220 bytes, one to a copy
    ("w3s2-2d", tpf.max_pool2d, F.max_pool2d, (8, 128, 97, 95),
     dict(kernel_size=3, stride=2, padding=1), True),
    ("w3s2-1d", tpf.max_pool1d, F.max_pool1d, (8, 256, 4611), dict(kernel_size=3, stride=2), True),
    # rows over 32 KiB: not staged, written in place
    ("w3s2-long-rows", tpf.max_pool1d, F.max_pool1d, (2, 4, 2**19 + 5),
     dict(kernel_size=3, stride=2), True),
    # channels-last, 128 channels: each cell whole cache lines, written straight from the
    # registers
    ("channels-last-max", tpf.max_pool2d, F.max_pool2d, (8, 128, 97, 95),
     dict(kernel_size=3, stride=2, padding=1), True),
    ("channels-last-avg", tpf.avg_pool2d, F.avg_pool2d, (8, 128, 98, 95),
     dict(kernel_size=3, stride=2, padding=1), False),
    # channels-last, 72 channels: output rows of 48 x 72 cells (13.5 KiB), one to a copy
    ("channels-last-max-staged", tpf.max_pool2d, F.max_pool2d, (16, 72, 97, 95),
     dict(kernel_size=3, stride=2, padding=1), True),
    ("channels-last-avg-staged", tpf.avg_pool2d, F.avg_pool2d, (16, 72, 98, 95),
     dict(kernel_size=3, stride=2, padding=1), False),
    # stride-1 square averages: whole planes of 35 x 35 (4900 bytes) to a copy
    ("box3", tpf.avg_pool2d, F.avg_pool2d, (16, 192, 35, 35),
     dict(kernel_size=3, stride=1, padding=1, count_include_pad=False), False),
    ("box2", tpf.avg_pool2d, F.avg_pool2d, (16, 192, 35, 35), dict(kernel_size=2, stride=1), False),
    # planes in bands of 20 rows (24 KB), one band to a copy
    ("box3-bands", tpf.avg_pool2d, F.avg_pool2d, (4, 4, 700, 301),
     dict(kernel_size=3, stride=1, padding=1), False),
    # bands over 32 KiB: not staged, written in place
    ("box3-wide", tpf.avg_pool2d, F.avg_pool2d, (1, 4, 80, 8192),
     dict(kernel_size=3, stride=1, padding=1, count_include_pad=False), False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_large_output(case):
    _, ours, theirs, shape, kwargs, exact = case
    gen = torch.Generator().manual_seed(shape[-1])
    x = make_input(shape, torch.float32, gen=gen)
    if case[0].startswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y_ref = theirs(x.double(), **kwargs).float()
    assert y_ref.numel() * 4 >= 8 * MIB  # the size from which the output is streamed
    for _ in range(2):
        with torch.no_grad():
            torch.neg(ours(x.neg(), **kwargs))  # an output of the same size, then freed
            y = ours(x, **kwargs)
        assert_close(y, y_ref, torch.float32, exact=exact)

    # training: values, indices (max) and the input gradient
    out, gx, g = run_fwd_bwd(lambda t: pool_outputs(ours, t, **kwargs), x, gen=gen)
    out_ref, gx_ref, _ = run_fwd_bwd(lambda t: pool_outputs(theirs, t, **kwargs), x.double(), g.double())
    if isinstance(out, tuple):
        assert_close(out[0], out_ref[0].float(), torch.float32, exact=exact)
        assert torch.equal(out[1], out_ref[1])
    else:
        assert_close(out, out_ref.float(), torch.float32, exact=exact)
    # overlapping windows sum several shares per cell, in another order than float64's
    assert_close(gx, gx_ref.float(), torch.float32)
    assert y.stride() == y_ref.stride() and gx.stride() == x.stride()


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_channels_last_nan_cells_among_streamed(train):
    """Windows holding a NaN take torch's compare chain and ordinary stores, between cells that
    go out by non-temporal stores (128 channels, an 8 MiB output): values, indices, gradients."""
    gen = torch.Generator().manual_seed(7)
    x = make_input((8, 128, 97, 95), torch.float32, gen=gen)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (300,), generator=gen)] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    kwargs = dict(kernel_size=3, stride=2, padding=1)
    if not train:
        with torch.no_grad():
            y = tpf.max_pool2d(x, **kwargs)
            y_ref = F.max_pool2d(x, **kwargs)
        assert y.numel() * 4 >= 8 * MIB and bool(torch.isnan(y_ref).any())
        assert_close(y, y_ref, torch.float32, exact=True, equal_nan=True)
        return
    out, gx, g = run_fwd_bwd(lambda t: tpf.max_pool2d(t, return_indices=True, **kwargs), x, gen=gen)
    out_ref, gx_ref, _ = run_fwd_bwd(lambda t: F.max_pool2d(t, return_indices=True, **kwargs), x, g)
    assert_close(out[0], out_ref[0], torch.float32, exact=True, equal_nan=True)
    assert torch.equal(out[1], out_ref[1])
    assert_close(gx, gx_ref, torch.float32, equal_nan=True)
