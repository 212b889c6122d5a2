"""Average pooling: parity with torch.nn.functional (values and gradients) for padding,
ceil_mode, count_include_pad and divisor_override; layouts, unbatched, empty batches,
determinism, gradcheck."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import torchpool.functional as tpf
from conftest import (
    DTYPES,
    HYPOTHESIS,
    POOL_SHAPES,
    ROW_END_WINDOWS,
    assert_close,
    assert_layout_follows,
    assert_tests_pass_with,
    check_backward_deterministic,
    check_layout_preserved,
    check_one_cell_output_layout,
    check_strided_grad_outputs,
    config_grid,
    make_input,
    pool_cases,
    python_with,
    ref_dtype,
    row_end_widths,
    run_fwd_bwd,
    torch_avg_pool2d,
)

OURS = {1: tpf.avg_pool1d, 2: tpf.avg_pool2d, 3: tpf.avg_pool3d}


def _lift(v):
    """1d argument -> the 2d argument of the equivalent pool over a unit leading dim."""
    if isinstance(v, int):
        return (1, v)
    return (1, *v)


def torch_avg_pool1d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                     divisor_override=None):
    """F.avg_pool1d has no divisor_override: run the same pool as a 2d pool with a unit height."""
    out = torch_avg_pool2d(
        x.unsqueeze(-2),
        _lift(kernel_size),
        None if stride is None else _lift(stride),
        (0, padding) if isinstance(padding, int) else (0, *padding),
        ceil_mode,
        count_include_pad,
        divisor_override,
    )
    return out.squeeze(-2)


TORCH = {1: torch_avg_pool1d, 2: torch_avg_pool2d, 3: F.avg_pool3d}

SHAPES = POOL_SHAPES
CONFIGS = {
    1: [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        dict(kernel_size=4, stride=3, padding=2, ceil_mode=True),
        dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),  # last window dropped by torch's rule
        dict(kernel_size=3, stride=1, padding=1, divisor_override=5),
        dict(kernel_size=5, stride=2, padding=2, ceil_mode=True, count_include_pad=False, divisor_override=2),
    ],
    2: [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True, count_include_pad=False),
        dict(kernel_size=3, stride=1, padding=1, divisor_override=4),
        dict(kernel_size=(2, 4), stride=(3, 2), padding=(1, 2), ceil_mode=True),
    ],
    3: [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        dict(kernel_size=(2, 3, 1), stride=(1, 2, 2), padding=(1, 1, 0), ceil_mode=True),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=9),
    ],
}
GRID = config_grid(CONFIGS)


def assert_within_sum_bound(actual, exact, abs_sum, n):
    """A float32 result that sums up to n terms (each rounded once) against the float64 value:
    the kernels may add in another order than torch (the stride-1 CPU paths sum rows, then
    columns), so the fixed tolerance of a cell-by-cell comparison does not fit large windows; the
    standard bound does: a sum of n terms in any order is within (n - 1) u sum|terms| of the exact
    sum (u = 2^-24), the terms' own rounding adds u sum|terms|, the final division or
    multiplication a few u of the result. abs_sum: sum|terms| per element (float64)."""
    u = 2.0 ** -24
    bound = abs_sum * (n * u) + exact.abs() * (4 * u)
    assert actual.dtype == torch.float32 and actual.shape == exact.shape
    assert bool((exact != 0).any()), "reference is all zeros"
    err = (actual.double() - exact).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"at flat index {worst.item()}"
    )


def check_float32_parity(x, nd, kw, out_inf, out, grad, g):
    """Values and gradient against torch's float64 pool within assert_within_sum_bound. The
    gradient is linear in g, so the same backward on |g| gives each cell's sum of |terms|."""
    ks = kw["kernel_size"]
    n = ks ** nd if isinstance(ks, int) else torch.tensor(ks).prod().item()
    x64 = x.detach().double()
    exact = TORCH[nd](x64, **kw)
    abs_sum = TORCH[nd](x64.abs(), **kw).abs()  # abs: a negative divisor_override
    assert_within_sum_bound(out_inf, exact, abs_sum, n)
    assert_within_sum_bound(out, exact, abs_sum, n)
    x64.requires_grad_()
    y64 = TORCH[nd](x64, **kw)
    g64 = g.double()
    (gexact,) = torch.autograd.grad(y64, x64, g64, retain_graph=True)
    (gabs,) = torch.autograd.grad(y64, x64, g64.abs())
    assert_within_sum_bound(grad, gexact, gabs.abs(), n)


def check_parity(x, nd, kw, gen):
    """Ours vs torch (half types: torch in float32 on the upcast input, then cast); float32 values
    against the float64 pool within the summation error bound."""
    dtype = x.dtype
    rd = ref_dtype(dtype)
    with torch.no_grad():
        out_inf = OURS[nd](x, **kw)
    out, grad, g = run_fwd_bwd(lambda t: OURS[nd](t, **kw), x, gen=gen)
    rout, rgrad, _ = run_fwd_bwd(lambda t: TORCH[nd](t, **kw), x.to(rd), g=g.to(rd))
    assert out.device == x.device
    if dtype == torch.float32:
        check_float32_parity(x, nd, kw, out_inf, out, grad, g)
    else:
        assert_close(out_inf, rout.to(dtype), dtype)
        assert_close(out, rout.to(dtype), dtype)
        assert_close(grad, rgrad.to(dtype), dtype)
    assert_layout_follows(x, out_inf, out, grad)


@pytest.mark.parametrize("nd,cfg,dtype,layout", GRID)
def test_matches_torch_grid(device, rng, nd, cfg, dtype, layout):
    x = make_input(SHAPES[nd], dtype, device, layout, rng)
    check_parity(x, nd, CONFIGS[nd][cfg], rng)


@HYPOTHESIS
@given(case=pool_cases("avg"))
def test_matches_torch_hypothesis(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_input(case["shape"], case["dtype"], device, case["layout"], gen)
    check_parity(x, case["nd"], case["kw"], gen)


# Planes of at most 64 cells with output rows under 8 wide, 8 planes or more: the CPU takes them
# eight planes a vector. Partial last blocks, planes that are and are not whole vectors, padding
# counted and not, a divisor override, ceil mode (the last window clipped).
TINY_PLANE_CASES = [
    ((2, 9, 7), dict(kernel_size=2)),
    ((3, 5, 13), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ((2, 4, 3, 3), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 4, 3, 3), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    ((2, 4, 2, 2), dict(kernel_size=2)),
    ((1, 8, 8, 8), dict(kernel_size=2, divisor_override=3)),
    ((2, 13, 5, 7), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ((3, 7, 4, 4), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ((2, 5, 3, 3, 3), dict(kernel_size=2, stride=1, padding=1, count_include_pad=False)),
    ((1, 9, 4, 3, 4), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,kw", TINY_PLANE_CASES)
def test_tiny_planes(device, rng, shape, kw, dtype):
    """Many tiny planes (1d to 3d): values and gradients as torch's."""
    x = make_input(shape, dtype, device, "contiguous", rng)
    check_parity(x, len(shape) - 2, kw, rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_negative_divisor_override(device, rng, nd):
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng)
    check_parity(x, nd, dict(kernel_size=3, stride=2, padding=1, divisor_override=-2), rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched(device, rng, nd, dtype):
    x = make_input(SHAPES[nd][1:], dtype, device, "contiguous", rng)
    check_parity(x, nd, dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_empty_batch(device, nd):
    x = torch.randn((0,) + SHAPES[nd][1:], device=device, requires_grad=True)
    kw = dict(kernel_size=3, stride=2, padding=1)
    out = OURS[nd](x, **kw)
    assert out.shape == TORCH[nd](x.detach(), **kw).shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layout_preserved(device, rng, nd, dtype, layout):
    x = make_input((2, 3) + SHAPES[nd][2:], dtype, device, layout, rng)
    check_layout_preserved(OURS[nd], x, layout, rng)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 64])
def test_one_cell_output_keeps_channels_last(device, rng, nd, dtype, channels):
    x = make_input((4, channels) + (3,) * nd, dtype, device, "channels_last", rng)
    check_one_cell_output_layout(OURS[nd], TORCH[nd], x, rng, dtype)


def test_keras_worked_example(device):
    x = torch.tensor([[1, 3, 2, 9], [5, 6, 1, 7], [4, 2, 8, 6], [3, 5, 7, 2]], dtype=torch.float32, device=device)
    out = tpf.avg_pool2d(x[None, None], kernel_size=2, stride=2)
    assert out.tolist() == [[[[3.75, 4.75], [3.5, 5.75]]]]
    out = tpf.avg_pool2d(x[None], kernel_size=2, stride=2)  # unbatched
    assert out.tolist() == [[[3.75, 4.75], [3.5, 5.75]]]


def test_explicit_divisors(device):
    """count_include_pad / divisor_override on a hand-computed 1d case."""
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]], device=device)
    # windows over [0, 1, 2, 3, 4, 5, 0] (padding 1): [0,1,2], [2,3,4], [4,5,0]
    assert tpf.avg_pool1d(x, 3, 2, 1).tolist() == [[[1.0, 3.0, 3.0]]]
    assert tpf.avg_pool1d(x, 3, 2, 1, count_include_pad=False).tolist() == [[[1.5, 3.0, 4.5]]]
    assert tpf.avg_pool1d(x, 3, 2, 1, divisor_override=2).tolist() == [[[1.5, 4.5, 4.5]]]
    # ceil_mode: the window that starts at 4 holds only 5 (and no padding after the input).
    assert tpf.avg_pool1d(x, 2, 2, ceil_mode=True).tolist() == [[[1.5, 3.5, 5.0]]]


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=4, stride=2, padding=2, count_include_pad=False, ceil_mode=True)])
def test_backward_deterministic(device, rng, nd, kw):
    """Overlapping windows: two backward runs are bit-identical (and match torch)."""
    shape = (2, 8, 48, 48) if nd == 2 else (2, 4, 12, 24, 24)
    x = make_input(shape, torch.float32, device, "contiguous", rng)
    check_backward_deterministic(lambda t: OURS[nd](t, **kw), lambda t: TORCH[nd](t, **kw), x, rng)


@pytest.mark.parametrize(
    "nd,kw,layout",
    [
        (1, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), "contiguous"),
        (1, dict(kernel_size=4, stride=1, padding=2, count_include_pad=False, divisor_override=3), "contiguous"),
        (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), count_include_pad=False), "contiguous"),
        (2, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), "channels_last"),
        (3, dict(kernel_size=2, stride=1, ceil_mode=True, divisor_override=5), "contiguous"),
        (3, dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), "channels_last"),
    ],
)
def test_gradcheck(device, rng, nd, kw, layout):
    shape = {1: (2, 2, 9), 2: (2, 2, 7, 6), 3: (1, 2, 5, 4, 5)}[nd]
    x = make_input(shape, torch.float64, device, layout, rng).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: OURS[nd](t, **kw), (x,))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "sliced"])
@pytest.mark.parametrize(
    "kw",
    [dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), dict(kernel_size=2, ceil_mode=True),
     dict(kernel_size=5, stride=1, padding=2, divisor_override=7)],
)
def test_larger_inputs(device, rng, layout, kw):
    """Sizes that do not divide evenly into the kernels' work chunks; many channels."""
    for shape in ((3, 37, 29, 31), (2, 19, 9, 13, 11)):
        x = make_input(shape, torch.float32, device, layout, rng)
        check_parity(x, len(shape) - 2, kw, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw", [dict(kernel_size=3, stride=1, padding=1, count_include_pad=False), dict(kernel_size=2)]
)
@pytest.mark.parametrize("shape", [(1, 1, 23, 29), (1, 2, 300, 260), (2, 1, 9, 130, 70)])
def test_backward_large_and_single_planes(device, rng, shape, kw, dtype):
    """The CPU backward builds planes of up to 256 KB whole in cache; it gathers per input row for
    larger planes, or when there are fewer planes than threads. These shapes take the gather
    (3x3 windows, and the single plane), or the direct tile writes (2x2 on the large planes)."""
    x = make_input(shape, dtype, device, "contiguous", rng)
    check_parity(x, len(shape) - 2, kw, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(), dict(divisor_override=3)])
@pytest.mark.parametrize(
    "shape", [(3, 4, 33), (2, 3, 17, 19), (4, 8, 26, 26), (2, 2, 7, 9, 21), (2, 3, 5, 201), (2, 2, 5, 4, 131)]
)
def test_backward_tiling_windows(device, rng, shape, kw, dtype):
    """2-wide windows that tile the input (kernel == stride, no padding): each input cell gets one
    output's grad / divisor, so the gradient equals torch's exactly, including the cells past the
    last window along each dim (odd sizes). Rows of 384 bytes or more (the last shapes in float32)
    are written one after the other, shorter ones chunk by chunk across them."""
    nd = len(shape) - 2
    x = make_input(shape, dtype, device, "contiguous", rng)
    out, grad, g = run_fwd_bwd(lambda t: OURS[nd](t, 2, **kw), x, gen=rng)
    rout, rgrad, _ = run_fwd_bwd(lambda t: TORCH[nd](t.float(), 2, **kw), x, g=g.float())
    assert_close(out, rout.to(dtype), dtype)
    assert torch.equal(grad, rgrad.to(dtype))


@pytest.mark.parametrize("kw", ROW_END_WINDOWS)
def test_backward_row_ends(device, rng, kw):
    """Single planes (fewer than the threads) of rows 1 to 40 cells wide: the CPU gathers each input
    row's gradient in chunks of 8 * stride cells, the row's first and last chunks written as whole
    vectors where the row holds one (see the max pool's test of the same name)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for width in row_end_widths(kw):
            x = make_input((1, 1, width), torch.float32, device, "contiguous", rng)
            check_parity(x, 1, kw, rng)
            x = make_input((1, 1, 3, width), torch.float32, device, "contiguous", rng)
            check_parity(x, 2, dict(kw, kernel_size=(2, kw["kernel_size"]), stride=(1, kw["stride"]),
                                    padding=(1, kw.get("padding", 0))), rng)
    finally:
        torch.set_num_threads(before)


STRIDE1_CASES = [
    # (shape, kw): windows of stride 1 along the last dim, which the CPU sums rows first
    ((2, 3, 7, 1), dict(kernel_size=(3, 1), stride=1, padding=(1, 0))),
    ((2, 3, 5, 5), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ((1, 2, 6, 8), dict(kernel_size=(2, 3), stride=1, padding=(1, 1))),
    ((1, 2, 4, 9), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True)),
    ((2, 2, 9, 16), dict(kernel_size=3, stride=1, padding=0)),
    ((1, 3, 8, 17), dict(kernel_size=(4, 5), stride=(3, 1), padding=2, ceil_mode=True, count_include_pad=False)),
    ((2, 4, 35, 35), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ((1, 2, 11, 23), dict(kernel_size=(5, 7), stride=1, padding=(2, 3), divisor_override=6)),
    ((1, 2, 3, 40), dict(kernel_size=(1, 3), stride=1, padding=(0, 1))),
    ((1, 2, 6, 5, 13), dict(kernel_size=(2, 3, 3), stride=(1, 2, 1), padding=1, count_include_pad=False)),
    ((2, 1, 5, 4, 9), dict(kernel_size=3, stride=1, padding=1, ceil_mode=True)),
    ((3, 1, 33, 20), dict(kernel_size=3, stride=1, padding=1)),  # 99 rows: 2 threads split a plane
    # square windows walked down columns in bands of rows (about 24 KB of input each): 5 and 4 bands
    ((1, 2, 50, 700), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ((2, 1, 30, 1100), dict(kernel_size=2, stride=1)),
    # 3 x 3, padding 1: planes of 16 to 2048 cells, whose forward reads each as one run, and one over
    ((1, 3, 1, 16), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 3, 2, 8), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ((3, 2, 9, 13), dict(kernel_size=3, stride=1, padding=1, divisor_override=5)),
    ((1, 2, 45, 45), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ((1, 2, 46, 45), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
]


@pytest.mark.parametrize("shape, kw", STRIDE1_CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_stride1_windows(device, rng, shape, kw, threads):
    """Stride 1 along W: rows narrower and wider than 8 floats, row widths off the multiples of 8,
    padding, ceil_mode, stride > 1 over H, 3d windows, and rows split between threads."""
    x = make_input(shape, torch.float32, device, "contiguous", rng)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_parity(x, len(shape) - 2, kw, rng)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=2, stride=(1, 2, 2), divisor_override=3)])
@pytest.mark.parametrize("shape", [(2, 3, 6, 12, 22), (1, 2, 4, 8, 16), (3, 2, 5, 7, 35)])
def test_two_deep_windows(device, rng, dtype, kw, shape):
    """2 x 2 x 2 windows, which the CPU sums one depth slice at a time (rows of 8 to 32 outputs, a
    last chunk overlapping the one before, odd sizes, depth windows at stride 2 and overlapping at
    stride 1), over inputs holding +inf and NaN: outputs and gradients against torch in float64."""
    x = torch.randn(shape, generator=rng)
    flat = x.view(-1)
    at = torch.randperm(x.numel(), generator=rng)
    flat[at[:3]] = float("inf")
    flat[at[3:6]] = float("nan")
    x = x.to(dtype=dtype, device=device)
    out, grad, g = run_fwd_bwd(lambda t: tpf.avg_pool3d(t, **kw), x, gen=rng)
    rout, rgrad, _ = run_fwd_bwd(lambda t: F.avg_pool3d(t, **kw), x.double(), g=g.double())
    with torch.no_grad():
        inferred = tpf.avg_pool3d(x, **kw)
    rout = rout.to(dtype)
    for o in (out, inferred):
        assert torch.equal(torch.isnan(o), torch.isnan(rout)) and torch.equal(torch.isinf(o), torch.isinf(rout))
        fin = torch.isfinite(rout)
        assert bool(fin.any()) and bool((~fin).any())
        assert_close(o[fin], rout[fin], dtype)
    assert_close(grad, rgrad.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17), (1, 2, 35, 35), (1, 1, 2, 8)])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_stride1_box_row_ends_hold_inf_and_nan(device, rng, dtype, shape, count_include_pad):
    """3 x 3 windows at stride 1, padding 1, whose rows' first and last cells hold +inf, -inf and NaN:
    the CPU's forward sums a plane's rows as one run of cells, so a row's last cell sees the next
    row's first until it is redone alone; its backward loads them beside the padding, masked.
    Outputs and gradients are NaN or infinite exactly where torch's are, and equal elsewhere (a NaN
    in the upstream gradient at a row's end too)."""
    x = torch.randn(shape, generator=rng)
    H, W = shape[-2:]
    x[..., 0] = torch.where(torch.rand(shape[:-1], generator=rng) < 0.3, float("inf"), x[..., 0])
    x[..., W - 1] = torch.where(torch.rand(shape[:-1], generator=rng) < 0.3, -float("inf"), x[..., W - 1])
    x[..., H // 2, W - 1] = float("nan")
    x = x.to(device=device, dtype=dtype)
    kw = dict(kernel_size=3, stride=1, padding=1, count_include_pad=count_include_pad)
    g = torch.randn(shape, generator=rng)
    g[..., H - 1, 0] = float("nan")
    g = g.to(device=device, dtype=dtype)
    (out, grad), (rout, rgrad) = [
        run_fwd_bwd(lambda t: f(t, **kw), x, g=g)[:2] for f in (tpf.avg_pool2d, F.avg_pool2d)
    ]
    with torch.no_grad():
        inferred = tpf.avg_pool2d(x, **kw)
    for o, r in ((out, rout), (inferred, rout), (grad, rgrad)):
        assert torch.equal(torch.isnan(o), torch.isnan(r))
        assert torch.equal(torch.isinf(o), torch.isinf(r)) and torch.equal(o[torch.isinf(o)], r[torch.isinf(r)])
        fin = torch.isfinite(r)
        assert bool(fin.any()) and bool((~fin).any())
        assert_close(o[fin], r[fin], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 1, 16), (2, 3, 2, 8), (3, 2, 9, 13), (2, 4, 35, 35),
                                   (1, 2, 45, 45), (1, 2, 46, 45)])
@pytest.mark.parametrize("kw", [dict(count_include_pad=False), dict(), dict(divisor_override=5)])
def test_half_stride1_3x3_forward(device, rng, dtype, shape, kw):
    """3 x 3 windows at stride 1, padding 1, in the half types over planes of 16 to 2048 cells
    (read as one run, widened to float, where the CPU's tuning takes that walk) and one over: the
    forward is torch's on the float64 input, rounded to the dtype."""
    x = make_input(shape, dtype, device, "contiguous", rng)
    kw = dict(kernel_size=3, stride=1, padding=1, **kw)
    with torch.no_grad():
        out = tpf.avg_pool2d(x, **kw)
    assert_close(out, F.avg_pool2d(x.double(), **kw).to(dtype), dtype)


@pytest.mark.parametrize("tune", ["intel", "amd"])
def test_cpu_tunings_stride1_3x3(device, tune):
    """Each vendor tuning of the CPU kernels (TORCHPOOL_CPU_TUNE=intel or amd: the half types'
    3 x 3 stride-1 forward over small planes as flat runs, or down columns) passes this file's
    tests of that forward, whichever CPU runs them."""
    if device != "cpu":
        pytest.skip("the tunings are the CPU kernels'")
    assert_tests_pass_with("test_avg_pool.py", "(half_stride1 or box_row_ends) and not tunings",
                           TORCHPOOL_CPU_TUNE=tune)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, kw",
    [
        ((3, 4, 33), dict(kernel_size=2)),
        ((4, 8, 26, 26), dict(kernel_size=2)),
        ((2, 3, 17, 19), dict(kernel_size=2, divisor_override=3)),
        ((2, 3, 17, 19), dict(kernel_size=2, divisor_override=8)),
        ((2, 3, 17, 19), dict(kernel_size=2, divisor_override=-2)),
        ((2, 3, 8, 40), dict(kernel_size=(2, 2), stride=(3, 2))),
        ((2, 3, 8, 40), dict(kernel_size=(1, 2), stride=(1, 2))),
        ((2, 2, 7, 9, 21), dict(kernel_size=2)),
        ((2, 2, 7, 9, 21), dict(kernel_size=(2, 1, 2), stride=(3, 1, 2), divisor_override=5)),
        ((2, 3, 8, 21), dict(kernel_size=2, ceil_mode=True)),
    ],
)
def test_two_wide_windows_inside_the_input(device, rng, shape, kw, dtype):
    """Windows two wide at W stride 2, all inside the input, over rows of 8 outputs or more (the
    last chunk overlapping the one before): the CPU takes a walk of its own for them, summing in
    torch's order (scan order, from 0) and dividing by the window size or the override (a power
    of two by a multiply). So on the CPU the result equals torch's (computed in float32 for the half
    types, rounded once) bit for bit, infinities and NaNs included. The last case has a window past
    the end (ceil_mode), which the walk leaves to the general one."""
    nd = len(shape) - 2
    x = make_input(shape, dtype, device, "contiguous", rng)
    flat = x.view(-1)
    for v in (float("nan"), float("inf"), -float("inf")):
        flat[torch.randperm(flat.numel(), generator=rng)[: flat.numel() // 40]] = v
    with torch.no_grad():
        out = OURS[nd](x, **kw)
        ref = TORCH[nd](x.float(), **kw).to(dtype)
    out_train = OURS[nd](x.detach().requires_grad_(), **kw).detach()
    nan = torch.isnan(ref)
    assert bool(nan.any()) and bool(torch.isinf(ref).any()) and bool((ref[~nan] != 0).any())
    for o in (out, out_train):
        assert torch.equal(torch.isnan(o), nan)
        if device == "cpu":
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(o[~nan].view(bits), ref[~nan].view(bits))
        else:
            assert_close(o[~nan], ref[~nan], dtype)


def test_wide_window(device, rng):
    x = make_input((2, 3, 40, 37), torch.float32, device, "contiguous", rng)
    check_parity(x, 2, dict(kernel_size=(20, 17), stride=3, padding=(10, 8), ceil_mode=True, count_include_pad=False), rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_with_strided_grad_output(device, rng, nd, layout):
    """out.sum().backward() passes an expanded (stride 0) gradient; a transposed one is not dense."""
    if layout == "channels_last" and nd == 1:
        layout = "permuted"
    x = make_input(SHAPES[nd], torch.float32, device, layout, rng)
    kw = dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)
    check_strided_grad_outputs(lambda t: OURS[nd](t, **kw), lambda t: TORCH[nd](t, **kw), x, rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_inference_mode(device, rng, nd):
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng)
    with torch.inference_mode():
        out = OURS[nd](x, 3, 2, 1)
    assert_close(out, TORCH[nd](x, 3, 2, 1))


# Channels-last geometries whose input rows are covered by 1 to 4 output rows, with gaps
# (stride over the kernel), padding, ceil mode, a divisor override, 3d windows
_CL_BACKWARD = (
    "import torch, torchpool.functional as tpf\n"
    "cases = [((2, 24, 13, 11), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),\n"
    "         ((2, 40, 13, 11), dict(kernel_size=3, stride=2, padding=1)),\n"
    "         ((2, 33, 12, 12), dict(kernel_size=2, stride=3)),\n"
    "         ((1, 16, 9, 9), dict(kernel_size=(2, 4), stride=(3, 1), padding=(1, 2), ceil_mode=True)),\n"
    "         ((2, 8, 17, 10), dict(kernel_size=5, stride=2, padding=2, divisor_override=3)),\n"
    "         ((1, 70, 9, 9), dict(kernel_size=4, stride=1, padding=1)),\n"
    "         ((2, 20, 7, 9, 8), dict(kernel_size=3, stride=2, padding=1))]\n"
    "gen = torch.Generator().manual_seed(5)\n"
    "out = []\n"
    "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
    "    for shape, kw in cases:\n"
    "        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d\n"
    "        pool = tpf.avg_pool2d if len(shape) == 4 else tpf.avg_pool3d\n"
    "        x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)\n"
    "        y = pool(x.requires_grad_(), **kw)\n"
    "        g = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=fmt)\n"
    "        y.backward(g)\n"
    "        out.append((x.detach(), g, kw, x.grad))\n"
    "import torchpool\n"
    "torch.save((torchpool.cpu_kernels()['isa'], out), PATH)\n"
)


def test_channels_last_backward_same_as_portable_path(device, tmp_path):
    """The AVX2 channels-last average backward divides each output once and sums the shares in
    registers; the portable kernels divide per input cell and sum in a row. Same order of
    additions, so the same gradients to the bit, in every dtype; and both match torch."""
    if device != "cpu":
        pytest.skip("the instruction sets are the CPU kernels'")
    results = {}
    for isa in ("base", ""):
        path = tmp_path / f"grads-{isa or 'default'}.pt"
        r = python_with(_CL_BACKWARD.replace("PATH", repr(str(path))), TORCHPOOL_CPU_ISA=isa)
        assert r.returncode == 0, r.stderr[-2000:]
        results[isa] = torch.load(path)
    (base_isa, base_grads), (isa, grads) = results["base"], results[""]
    assert base_isa == "base" and len(base_grads) == 21
    for (x, g, kw, base), (_, _, _, fast) in zip(base_grads, grads):
        assert torch.equal(base, fast), kw
        pool = torch_avg_pool2d if x.dim() == 4 else F.avg_pool3d
        _, want, _ = run_fwd_bwd(lambda t: pool(t, **kw), x.double(), g.double())
        assert_close(fast, want.to(x.dtype), x.dtype)
    if isa == "base":
        pytest.skip("no AVX2 kernels on this machine: both runs took the portable path")


@pytest.mark.parametrize("channels", [16, 48], ids=["forty-rows-kept", "portable-path"])
def test_channels_last_backward_tall_windows(device, channels):
    """Windows 40 rows tall over rows of 1600 outputs: each input row needs up to 40 output rows.
    The AVX2 backward keeps them all (16 channels: 4 MiB a task) or, over 8 MiB (48 channels),
    leaves the input to the portable path; both against torch."""
    gen = torch.Generator().manual_seed(channels)
    x = make_input((1, channels, 80, 1602), torch.float32, device, "channels_last", gen)
    out, gx, g = run_fwd_bwd(lambda t: tpf.avg_pool2d(t, (40, 3), 1), x, gen=gen)
    out_ref, gx_ref, _ = run_fwd_bwd(lambda t: F.avg_pool2d(t, (40, 3), 1), x.double(), g.double())
    assert_close(out, out_ref.float(), torch.float32)
    assert_close(gx, gx_ref.float(), torch.float32)
    assert gx.is_contiguous(memory_format=torch.channels_last)
