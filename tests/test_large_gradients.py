"""Float input gradients of 32 MiB or more: the CPU window backwards write them out with
non-temporal stores, straight from the registers where rows or cells are whole cache lines and
otherwise staged in cache; the global backwards do so from 16 MiB (zeros and fills by
non-temporal stores, short planes and channels-last rows staged). Each kernel that does so is
compared with torch here, at sizes whose rows and planes neither start nor end on cache-line
boundaries and at sizes whose rows do; bfloat16 at the same sizes (written as before) too."""
import pytest
import torch
import torch.nn.functional as F

import torchpool.functional as tpf
from conftest import (assert_close, assert_tests_pass_with, make_input, ref_dtype, run_fwd_bwd,
                      to_layout)

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
    # even sizes: every cell in a window, so a plane's last partial line holds nonzero shares
    # (a block of 32 MiB or more comes fresh from the system, zeroed)
    ("tiles-avg", tpf.avg_pool2d, F.avg_pool2d, (8, 128, 98, 94), torch.float32, "contiguous",
     dict(kernel_size=2), False),
    # planes of 1.2 KiB: three to a staged copy, none on line boundaries
    ("tiles-short-planes", tpf.max_pool2d, F.max_pool2d, (64, 432, 15, 21), torch.float32,
     "contiguous", dict(kernel_size=2), True),
    ("tiles-short-planes-avg", tpf.avg_pool2d, F.avg_pool2d, (64, 432, 14, 22), torch.float32,
     "contiguous", dict(kernel_size=2), False),
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
    # rows of 4 KiB or more on cache-line boundaries, no padding: written straight from the
    # registers, the row's chunks inside it streamed, its last cells by ordinary stores
    ("fused-1d-rows-on-lines", tpf.max_pool1d, F.max_pool1d, (8, 256, 4096), torch.float32,
     "contiguous", dict(kernel_size=3, stride=2), False),
    ("fused-rows-on-lines", tpf.max_pool2d, F.max_pool2d, (2, 16, 257, 1024), torch.float32,
     "contiguous", dict(kernel_size=3, stride=2), False),
    # channels-last, row by row: 128 channels (whole lines, written straight from the registers)
    # and 72 (staged)
    ("channels-last", tpf.max_pool2d, F.max_pool2d, (8, 128, 96, 97), torch.float32, "channels_last",
     dict(kernel_size=3, stride=2, padding=1), False),
    ("channels-last-staged", tpf.max_pool2d, F.max_pool2d, (10, 72, 112, 113), torch.float32,
     "channels_last", dict(kernel_size=3, stride=2, padding=1), False),
    ("channels-last-avg", tpf.avg_pool2d, F.avg_pool2d, (8, 128, 96, 97), torch.float32,
     "channels_last", dict(kernel_size=3, stride=2, padding=1), False),
    ("channels-last-avg-staged", tpf.avg_pool2d, F.avg_pool2d, (10, 72, 112, 113), torch.float32,
     "channels_last", dict(kernel_size=3, stride=2, padding=1), False),
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


# (id, shape, layout): short planes (staged), planes too long to stage, channels-last rows
GLOBAL_CASES = [
    ("short-planes", (64, 1003, 9, 9), "contiguous"),
    ("long-planes", (2, 8, 511, 521), "contiguous"),
    ("channels-last", (16, 257, 33, 33), "channels_last"),
]


@pytest.mark.parametrize("case", GLOBAL_CASES, ids=[c[0] for c in GLOBAL_CASES])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_large_global_gradient(case, kind):
    """The global backwards from 16 MiB, into memory that held another gradient's nonzeros just
    before (the output blocks are recycled), against torch's adaptive pools."""
    _, shape, layout = case
    gen = torch.Generator().manual_seed(shape[1])
    x = to_layout(make_input(shape, torch.float32, gen=gen), layout)
    assert x.numel() * x.element_size() >= 16 * MIB
    ours = tpf.global_max_pool2d if kind == "max" else tpf.global_avg_pool2d
    theirs = F.adaptive_max_pool2d if kind == "max" else F.adaptive_avg_pool2d
    other = tpf.global_avg_pool2d if kind == "max" else tpf.global_max_pool2d
    for _ in range(2):
        run_fwd_bwd(other, x, gen=gen)  # a gradient of the same size, then freed
        y, gx, g = run_fwd_bwd(ours, x, gen=gen)
        y_ref, gx_ref, _ = run_fwd_bwd(lambda t: theirs(t, 1).flatten(1), x, g)
        assert_close(y, y_ref, torch.float32, exact=kind == "max")
        assert_close(gx, gx_ref, torch.float32, exact=kind == "max")
        assert gx.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, layout", [
    ((4, 48, 211, 223), "contiguous"),  # planes too long to stage
    ((64, 2048, 7, 7), "contiguous"),   # planes of 49 cells: two planes in some vectors
    ((5, 65536, 4, 4), "contiguous"),   # planes of one vector's 16 cells
    ((3, 100003, 1, 17), "contiguous"),  # 17 cells: planes and tasks cut across lines
    ((2, 300000, 3, 5), "contiguous"),  # 15 cells: under a vector, written plane by plane
    ((64, 2048, 7, 7), "channels_last"),  # rows of whole lines
    ((5, 40, 211, 211), "channels_last"),  # rows of 40 cells: not whole lines
])
def test_large_half_global_average_gradient(dtype, shape, layout):
    """Half-type global averages from 8 MiB: NCHW planes of 16 cells or more, and channels-last
    rows of whole lines, written by non-temporal stores (lines cut at both ends of every range),
    the others as before, into memory that held another gradient's nonzeros just before, against
    torch's adaptive average in float64."""
    gen = torch.Generator().manual_seed(211)
    x = to_layout(make_input(shape, dtype, gen=gen), layout)
    assert x.numel() * x.element_size() >= 8 * MIB
    cells = shape[2] * shape[3]
    for _ in range(2):
        run_fwd_bwd(tpf.global_max_pool2d, x, gen=gen)  # a gradient of the same size, then freed
        # an upstream gradient of about `cells`, so that every input cell's share is about 1
        g = (torch.randn(shape[:2], generator=gen) * cells).to(dtype)
        y, gx, _ = run_fwd_bwd(tpf.global_avg_pool2d, x, g)
        y_ref, gx_ref, _ = run_fwd_bwd(lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1),
                                       x.double(), g.double())
        assert_close(y, y_ref.to(dtype), dtype)
        assert_close(gx, gx_ref.to(dtype), dtype)
        assert gx.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_half_global_max_gradient(dtype):
    """Half-type global maxima from 8 MiB with planes too long to stage: the result zeroed (by
    non-temporal stores, where the tuning says: lines cut at both ends of every plane), then each
    plane's gradient put in its maximum's cell, into memory whose every cell held another
    gradient's nonzero just before; the gradient to the bit against torch's adaptive max's."""
    shape = (4, 48, 211, 223)
    gen = torch.Generator().manual_seed(223)
    x = make_input(shape, dtype, gen=gen)
    assert x.numel() * x.element_size() >= 8 * MIB
    for _ in range(2):
        run_fwd_bwd(tpf.global_avg_pool2d, x, gen=gen)  # a gradient of the same size, then freed
        y, gx, g = run_fwd_bwd(tpf.global_max_pool2d, x, gen=gen)
        y_ref, gx_ref, _ = run_fwd_bwd(lambda t: F.adaptive_max_pool2d(t, 1).flatten(1),
                                       x.double(), g.double())
        assert torch.equal(y, y_ref.to(dtype))
        assert torch.equal(gx, gx_ref.to(dtype))
        assert int((gx != 0).sum()) == shape[0] * shape[1]


# plane sizes (H, W): 8 cells and more are written vector by vector, two planes blended where
# one ends (at every lane, as the planes shift against the 8-cell vectors); 6 cells are not
PLANES = [(2, 3), (2, 4), (3, 3), (3, 5), (4, 4), (1, 17), (7, 7), (7, 9)]


@pytest.mark.parametrize("plane", PLANES, ids=[f"{h}x{w}" for h, w in PLANES])
def test_large_global_average_gradient_exact(plane):
    """The float global average's gradient from 16 MiB, NCHW: every cell is its plane's upstream
    gradient divided by the cell count in float32, torch's own `g / count`, to the bit. Into
    memory that held another gradient's nonzeros just before; an odd channel count, so that the
    threads' ranges of planes start and end inside cache lines."""
    h, w = plane
    channels = (16 * MIB) // (4 * 64 * h * w) + 3
    gen = torch.Generator().manual_seed(h * w)
    x = make_input((64, channels, h, w), torch.float32, gen=gen)
    g = torch.randn(64, channels, generator=gen)
    for _ in range(2):
        run_fwd_bwd(tpf.global_max_pool2d, x, gen=gen)  # a gradient of the same size, then freed
        _, gx, _ = run_fwd_bwd(tpf.global_avg_pool2d, x, g)
        assert torch.equal(gx, (g / (h * w))[:, :, None, None].expand_as(x))


@pytest.mark.parametrize("channels", [2048, 2040], ids=["whole-lines", "partial-lines"])
def test_large_global_average_gradient_exact_channels_last(channels):
    """As above, channels-last: rows of whole cache lines (each sample's means copied straight
    out to every cell) and rows that end inside a line (staged), to the bit."""
    gen = torch.Generator().manual_seed(channels)
    x = make_input((64, channels, 7, 7), torch.float32, gen=gen).contiguous(memory_format=torch.channels_last)
    assert x.numel() * x.element_size() >= 16 * MIB
    g = torch.randn(64, channels, generator=gen)
    for _ in range(2):
        run_fwd_bwd(tpf.global_max_pool2d, x, gen=gen)  # a gradient of the same size, then freed
        _, gx, _ = run_fwd_bwd(tpf.global_avg_pool2d, x, g)
        assert gx.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gx, (g / 49)[:, :, None, None].expand_as(x))


@pytest.mark.parametrize("tune", ["intel", "amd"])
def test_cpu_tunings_large_results(tune):
    """Each vendor tuning of the CPU kernels (TORCHPOOL_CPU_TUNE=intel or amd: the half types'
    large global max gradients zeroed by non-temporal stores or by memset) passes the half-type
    global cases here, whichever CPU runs them."""
    assert_tests_pass_with("test_large_gradients.py", "half and not tunings", TORCHPOOL_CPU_TUNE=tune)
