"""Max pooling: parity with torch.nn.functional (values, return_indices, gradients), layouts,
unbatched and empty batches, NaN/inf, ties, determinism, gradcheck."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import torchpool.functional as tpf
from conftest import (
    DTYPES,
    HALF_DTYPES,
    HYPOTHESIS,
    LAYOUTS,
    ND_LAYOUTS,
    POOL_SHAPES,
    ROW_END_WINDOWS,
    assert_close,
    assert_tests_pass_with,
    assert_layout_follows,
    check_backward_deterministic,
    check_layout_preserved,
    check_one_cell_output_layout,
    check_strided_grad_outputs,
    config_grid,
    make_input,
    pool_cases,
    ref_dtype,
    row_end_widths,
    run_fwd_bwd,
    to_layout,
)

OURS = {1: tpf.max_pool1d, 2: tpf.max_pool2d, 3: tpf.max_pool3d}
TORCH = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}

SHAPES = POOL_SHAPES
CONFIGS = {
    1: [
        dict(kernel_size=2),
        dict(kernel_size=1, stride=1),
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),  # last window dropped by torch's rule
        dict(kernel_size=4, stride=3, padding=2, dilation=2, ceil_mode=True),
        dict(kernel_size=5, stride=2, dilation=3),
    ],
    2: [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
        dict(kernel_size=3, stride=3, padding=1, ceil_mode=True),
        dict(kernel_size=(5, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 3)),
    ],
    3: [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3, 1), stride=(1, 2, 2), padding=(1, 1, 0), dilation=(2, 1, 1), ceil_mode=True),
        dict(kernel_size=3, stride=2, ceil_mode=True),
    ],
}
GRID = config_grid(CONFIGS)


def spatial_flat(t, nd):
    return t.reshape(*t.shape[: t.dim() - nd], -1)


def check_parity(x, nd, kw, gen, reference_device=None):
    """Ours vs torch: inference and training forward, return_indices, gradients.

    Indices must equal torch's exactly for float32/64 (inputs here have no ties within a window, or
    ties that torch breaks by taking the first); for half types they must point at a maximum.
    """
    dtype = x.dtype
    rd = ref_dtype(dtype)
    ours, ref = OURS[nd], TORCH[nd]
    xr = x.to(dtype=rd, device=reference_device or x.device)

    with torch.no_grad():
        out_inf = ours(x, **kw)
        idx_inf = ours(x, return_indices=True, **kw)[1]
    (out, idx), grad, g = run_fwd_bwd(lambda t: ours(t, return_indices=True, **kw), x, gen=gen)
    out_plain, grad_plain, _ = run_fwd_bwd(lambda t: ours(t, **kw), x, g=g)
    (rout, ridx), rgrad, _ = run_fwd_bwd(
        lambda t: ref(t, return_indices=True, **kw), xr, g=g.to(dtype=rd, device=xr.device)
    )
    rout, ridx, rgrad = rout.to(dtype=dtype, device=x.device), ridx.to(x.device), rgrad.to(dtype=dtype, device=x.device)

    for o in (out_inf, out, out_plain):
        assert o.device == x.device
        assert_close(o, rout, exact=True, equal_nan=True)
    for i in (idx_inf, idx):
        assert i.dtype == torch.int64 and i.shape == rout.shape
        if dtype in HALF_DTYPES:
            picked = spatial_flat(x, nd).gather(-1, spatial_flat(i, nd))
            assert_close(picked, spatial_flat(rout, nd), exact=True, equal_nan=True)
        else:
            assert torch.equal(i, ridx), (i, ridx)
    assert_close(grad, rgrad, dtype)
    assert_close(grad_plain, rgrad, dtype)
    assert_layout_follows(x, out_inf, out, out_plain, grad, grad_plain)


@pytest.mark.parametrize("nd,cfg,dtype,layout", GRID)
def test_matches_torch_grid(device, rng, nd, cfg, dtype, layout):
    x = make_input(SHAPES[nd], dtype, device, layout, rng, kind="distinct")
    check_parity(x, nd, CONFIGS[nd][cfg], rng)


@HYPOTHESIS
@given(case=pool_cases("max"))
def test_matches_torch_hypothesis(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_input(case["shape"], case["dtype"], device, case["layout"], gen, kind="distinct")
    check_parity(x, case["nd"], case["kw"], gen)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched(device, rng, nd, dtype):
    x = make_input(SHAPES[nd][1:], dtype, device, "contiguous", rng, kind="distinct")
    check_parity(x, nd, dict(kernel_size=3, stride=2, padding=1), rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("return_indices", [False, True])
def test_empty_batch(device, nd, return_indices):
    x = torch.randn((0,) + SHAPES[nd][1:], device=device, requires_grad=True)
    kw = dict(kernel_size=3, stride=2, padding=1, return_indices=return_indices)
    out = OURS[nd](x, **kw)
    ref = TORCH[nd](x.detach(), **kw)
    if return_indices:
        assert out[1].shape == ref[1].shape and out[1].dtype == torch.int64
        out, ref = out[0], ref[0]
    assert out.shape == ref.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layout_preserved(device, rng, nd, dtype, layout):
    x = make_input((2, 3) + SHAPES[nd][2:], dtype, device, layout, rng, kind="distinct")
    check_layout_preserved(OURS[nd], x, layout, rng)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 64])
def test_one_cell_output_keeps_channels_last(device, rng, nd, dtype, channels):
    x = make_input((4, channels) + (3,) * nd, dtype, device, "channels_last", rng, kind="distinct")
    check_one_cell_output_layout(OURS[nd], TORCH[nd], x, rng, dtype)


@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
def test_training_with_indices_through_max_unpool(device, rng, nd, layout):
    """return_indices in training (an unpooling model): the op's autograd node, built in C++; the
    indices carry no gradient; the gradient through max_unpool and the pool is torch's."""
    x = make_input(SHAPES[nd], torch.float64, device, layout, rng, kind="distinct")
    kw = dict(kernel_size=3, stride=2, padding=1)
    size = x.shape[-nd:]
    w = torch.randn(x.shape, generator=rng, dtype=torch.float64).to(device)

    def loss(pool, t):
        out, idx = pool(t, return_indices=True, **kw)
        return (UNPOOL[nd](out * out, idx, output_size=size, **kw) * w).sum(), out, idx

    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, out, idx = loss(OURS[nd], xo)
    assert out.grad_fn.name().startswith("torch::autograd::CppNode<torchpool::")
    assert not idx.requires_grad
    want = loss(TORCH[nd], xr)[0]
    got.backward()
    want.backward()
    assert_close(got.detach(), want.detach())
    assert_close(xo.grad, xr.grad)


@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
def test_indices_accepted_by_max_unpool(device, rng, nd, layout):
    x = make_input(SHAPES[nd], torch.float32, device, layout, rng, kind="distinct")
    kw = dict(kernel_size=3, stride=2, padding=1)
    out, idx = OURS[nd](x, return_indices=True, **kw)
    rout, ridx = TORCH[nd](x, return_indices=True, **kw)
    size = x.shape[-nd:]
    un = UNPOOL[nd](out, idx, output_size=size, **kw)
    assert_close(un, UNPOOL[nd](rout, ridx, output_size=size, **kw), exact=True)
    # Every pooled maximum lands back where it came from.
    back = spatial_flat(un, nd).gather(-1, spatial_flat(idx, nd))
    assert_close(back, spatial_flat(out, nd), exact=True)
    assert_close(spatial_flat(x, nd).gather(-1, spatial_flat(idx, nd)), spatial_flat(out, nd), exact=True)


@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
def test_ties_first_maximum_wins(device, rng, nd, layout):
    """Many ties: values, indices and gradients equal torch CPU's (which picks the first maximum)."""
    x = make_input(SHAPES[nd], torch.float32, device, layout, rng, kind="ties")
    for kw in (dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, dilation=2)):
        check_parity(x, nd, kw, rng, reference_device="cpu")


def test_ties_first_maximum_wins_explicit(device):
    x = torch.tensor([[[5.0, 5.0, 1.0, 7.0, 7.0, 7.0]]], device=device)
    out, idx = tpf.max_pool1d(x, 3, 3, return_indices=True)
    assert out.tolist() == [[[5.0, 7.0]]]
    assert idx.tolist() == [[[0, 3]]]
    xg = x.clone().requires_grad_()
    tpf.max_pool1d(xg, 3, 3).backward(torch.tensor([[[2.0, 3.0]]], device=device))
    assert xg.grad.tolist() == [[[2.0, 0.0, 0.0, 3.0, 0.0, 0.0]]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(device, dtype):
    """A NaN in a window makes the output NaN; its index and gradient go to the NaN (as torch)."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 2, 3] = float("nan")
    x[1, 2, 9, 12] = float("nan")
    x[1, 2, 15, 0] = float("nan")
    x = x.to(device)
    for kw in (dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1)):
        out = tpf.max_pool2d(x, **kw)
        ref = F.max_pool2d(x.float(), **kw).to(dtype)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert int(torch.isnan(out).sum()) >= 3
        check_parity(x, 2, kw, torch.Generator().manual_seed(1))
    # Explicit: a NaN that is not the first cell of its window still wins.
    y = torch.tensor([[[1.0, float("nan"), 3.0, 0.5]]], dtype=dtype, device=device)
    out, idx = tpf.max_pool1d(y, 2, return_indices=True)
    assert torch.isnan(out[0, 0, 0]) and out[0, 0, 1].item() == 3.0
    assert idx.tolist() == [[[1, 2]]]


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_infinities_and_padding(device, nd):
    """An all -inf window next to the padding still returns -inf at an in-bounds index (torch)."""
    x = torch.full(SHAPES[nd], float("-inf"), device=device)
    x.view(-1)[::7] = float("inf")
    x.view(-1)[::11] = -1.0
    check_parity(x, nd, dict(kernel_size=3, stride=1, padding=1), torch.Generator().manual_seed(0))
    neg = torch.full(SHAPES[nd], float("-inf"), device=device)
    out, idx = OURS[nd](neg, kernel_size=3, stride=2, padding=1, return_indices=True)
    assert bool((out == float("-inf")).all())
    rout, ridx = TORCH[nd](neg, kernel_size=3, stride=2, padding=1, return_indices=True)
    assert torch.equal(idx, ridx)


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=1), dict(kernel_size=(2, 3), stride=(1, 2))])
def test_all_minus_inf_windows_inside_wide_rows(device, rng, kw):
    """Windows of -inf only, away from the row ends (rows of 40+ outputs): torch reports each
    window's first cell."""
    x = torch.randn(2, 3, 6, 90, generator=rng).to(device)
    x[:, :, 1:5, 20:70] = float("-inf")
    x[0, 1] = float("-inf")
    out, idx = tpf.max_pool2d(x, return_indices=True, **kw)
    rout, ridx = F.max_pool2d(x, return_indices=True, **kw)
    assert bool((rout == float("-inf")).any())
    assert torch.equal(out, rout)
    assert torch.equal(idx, ridx)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=1)])
def test_infinities_and_huge_values_in_wide_rows(device, rng, nd, kw):
    """Windows holding both +inf and -inf, or finite values whose sum overflows, among NaNs, in
    rows of 70 cells: values and indices as torch's, with and without return_indices."""
    shape = {1: (4, 5, 70), 2: (2, 3, 7, 70), 3: (2, 2, 5, 6, 70)}[nd]
    x = torch.randn(shape, generator=rng)
    pick = torch.rand(shape, generator=rng)
    x[pick < 0.15] = float("inf")
    x[(pick >= 0.15) & (pick < 0.3)] = float("-inf")
    x[(pick >= 0.3) & (pick < 0.45)] = 3e38
    x[(pick >= 0.45) & (pick < 0.5)] = -3e38
    x[pick > 0.99] = float("nan")
    x = x.to(device)
    ref, ridx = TORCH[nd](x, return_indices=True, **kw)
    with torch.no_grad():
        out = OURS[nd](x, **kw)
    out2, idx = OURS[nd](x, return_indices=True, **kw)
    assert bool(torch.isnan(ref).any()) and bool((ref == float("inf")).any())
    for o in (out, out2):
        assert torch.equal(torch.isnan(o), torch.isnan(ref))
        assert torch.equal(o.nan_to_num(0.0), ref.nan_to_num(0.0))
    assert torch.equal(idx, ridx)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=1)])
def test_signed_zero_ties_keep_the_first(device, rng, layout, kw):
    """Windows whose maximum is 0, held by +0 and -0 cells: torch keeps the first in scan order, sign
    included (the output's sign bit and the index must match)."""
    sign = torch.randint(0, 2, (2, 4, 10, 70), generator=rng).bool()
    zeros = torch.where(sign, torch.tensor(-0.0), torch.tensor(0.0))
    neg = -torch.rand(2, 4, 10, 70, generator=rng) - 0.5
    x = torch.where(torch.rand(2, 4, 10, 70, generator=rng) < 0.7, zeros, neg)
    x = to_layout(x.to(device), layout)
    out, idx = tpf.max_pool2d(x, return_indices=True, **kw)
    rout, ridx = F.max_pool2d(x, return_indices=True, **kw)
    zero = rout == 0
    assert zero.float().mean() > 0.9
    assert bool(torch.signbit(rout[zero]).any()) and not bool(torch.signbit(rout[zero]).all())
    assert torch.equal(out, rout)
    assert torch.equal(torch.signbit(out), torch.signbit(rout))
    assert torch.equal(idx, ridx)
    with torch.no_grad():
        assert torch.equal(torch.signbit(tpf.max_pool2d(x, **kw)), torch.signbit(rout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 6, 12, 22), (1, 2, 4, 8, 16), (3, 2, 5, 7, 35), (1, 4, 2, 2, 64)])
def test_two_deep_windows_ties_zeros_nans(device, rng, dtype, shape):
    """2 x 2 x 2 windows read one depth slice at a time (rows of 8 to 32 outputs, a last chunk
    overlapping the one before, odd sizes that drop the last slice, row and column): values from a
    few integers, so that most windows hold ties within a slice and across the two, +0 and -0, and
    NaNs in either slice. Values and the sign bits of zeros, NaNs, torch's indices (float32; half
    types: a cell holding the maximum) and the gradient, without and with grad."""
    v = torch.randint(-3, 2, shape, generator=rng).to(torch.float32)
    v = torch.where((v == 0) & (torch.rand(shape, generator=rng) < 0.5), torch.tensor(-0.0), v)
    nan_at = torch.randperm(v.numel(), generator=rng)[: max(2, v.numel() // 300)]
    v.view(-1)[nan_at] = float("nan")
    x = v.to(dtype=dtype, device=device)
    (rout, ridx), rgrad, g = run_fwd_bwd(lambda t: F.max_pool3d(t, 2, return_indices=True), x.float(), gen=rng)
    assert bool(torch.isnan(rout).any()) and bool((~torch.isnan(rout)).any())
    with torch.no_grad():
        inferred = tpf.max_pool3d(x, 2)
    (out, idx), grad, _ = run_fwd_bwd(lambda t: tpf.max_pool3d(t, 2, return_indices=True), x, g=g.to(dtype))
    for o in (inferred, out):
        assert torch.equal(torch.isnan(o), torch.isnan(rout))
        assert torch.equal(o.float().nan_to_num(5.0), rout.nan_to_num(5.0))
        kept = ~torch.isnan(rout)  # a NaN's sign bit is not kept by the conversions
        assert torch.equal(torch.signbit(o)[kept], torch.signbit(rout)[kept])
    if dtype == torch.float32:
        assert torch.equal(idx, ridx)
    else:
        picked = spatial_flat(x, 3).gather(-1, spatial_flat(idx, 3))
        assert_close(picked, spatial_flat(rout.to(dtype), 3), exact=True, equal_nan=True)
    assert_close(grad, rgrad.to(dtype), dtype)


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=1)])
def test_nan_inside_wide_rows(device, rng, kw):
    """Single NaNs at random cells of rows of 90 (chunks away from the row ends), any window cell:
    the output is NaN exactly where torch's is, with torch's indices."""
    x = torch.randn(2, 3, 8, 90, generator=rng)
    x.view(-1)[torch.randperm(x.numel(), generator=rng)[:40]] = float("nan")
    x = x.to(device)
    rout, ridx = F.max_pool2d(x, return_indices=True, **kw)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, idx = tpf.max_pool2d(x.clone().requires_grad_(grad), return_indices=True, **kw)
            assert torch.equal(torch.isnan(out), torch.isnan(rout))
            assert_close(out.detach(), rout, exact=True, equal_nan=True)
            assert torch.equal(idx, ridx)
    with torch.no_grad():
        assert_close(tpf.max_pool2d(x, **kw), rout, exact=True, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [5, 45, 64])
@pytest.mark.parametrize("nd,kw", [(2, dict(kernel_size=3, stride=2, padding=1)), (2, dict(kernel_size=2)),
                                   (2, dict(kernel_size=(2, 3), stride=(3, 1), dilation=(2, 1))),
                                   (3, dict(kernel_size=3, stride=2, padding=1))])
def test_few_nans_channels_last_training(device, rng, dtype, channels, nd, kw):
    """A few NaNs in an otherwise finite channels-last input, so that most output rows read no NaN
    and some do (rows shared by two output rows, rows no window reads, a last partial vector of
    channels): outputs, indices and gradients as torch's, in training and in inference."""
    shape = (3, channels, 13, 11) if nd == 2 else (2, channels, 7, 6, 9)
    x = torch.randn(shape, generator=rng)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=rng)[:4]] = float("nan")
    flat[-1] = float("nan")  # the last channel of the last cell: the scalar tail of a row
    x[(1, channels // 2, 3, 5) if nd == 2 else (1, channels // 2, 2, 3, 4)] = float("nan")  # a cell read
    x = to_layout(x.to(dtype).to(device), "channels_last")
    rx = x.float().contiguous().requires_grad_()
    rout, ridx = TORCH[nd](rx, return_indices=True, **kw)
    nan = torch.isnan(rout.detach())
    assert bool(nan.any()) and bool((~nan).any())
    xg = x.clone().requires_grad_()
    out, idx = OURS[nd](xg, return_indices=True, **kw)
    with torch.no_grad():
        out_inf = OURS[nd](x, **kw)
    for o in (out_inf, out.detach()):
        assert torch.equal(torch.isnan(o), nan)
        assert torch.equal(o[~nan].float(), rout.detach()[~nan])
    assert torch.equal(idx, ridx)
    g = torch.randn(rout.shape, generator=rng)
    (rgx,) = torch.autograd.grad(rout, rx, g)
    (gx,) = torch.autograd.grad(out, xg, g.to(dtype).to(device))
    assert_close(gx.float(), rgx, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [5, 8, 45, 64])
@pytest.mark.parametrize("nd,kw", [(2, dict(kernel_size=3, stride=2, padding=1)), (2, dict(kernel_size=2)),
                                   (2, dict(kernel_size=(2, 3), stride=1, dilation=(2, 1))),
                                   (3, dict(kernel_size=3, stride=2, padding=1))])
def test_nan_and_infinities_channels_last(device, rng, dtype, channels, nd, kw):
    """Channels-last windows holding NaNs (one or several, in any channel block: blocks of 32, of 8
    and a last partial one), +inf and -inf: NaN exactly where torch's output has it, the other
    values equal, the index that of the last NaN or else of the first maximum, with and without
    return_indices and in inference."""
    shape = (2, channels, 9, 11) if nd == 2 else (2, channels, 5, 6, 7)
    x = torch.randn(shape, generator=rng)
    pick = torch.rand(shape, generator=rng)
    x[pick < 0.04] = float("nan")
    x[(pick >= 0.04) & (pick < 0.08)] = float("inf")
    x[(pick >= 0.08) & (pick < 0.2)] = float("-inf")
    x = to_layout(x.to(dtype).to(device), "channels_last")
    # The reference pools NCHW: torch's channels-last CUDA kernel starts each window's index at
    # 0 (max_pool_forward_nhwc), so a window of -infs gets index 0, a cell outside most windows;
    # its NCHW kernel and the CPU give the window's first cell, as torchpool does.
    rout, ridx = TORCH[nd](x.float().contiguous(), return_indices=True, **kw)
    nan = torch.isnan(rout)
    assert bool(nan.any()) and bool((~nan).any()) and bool((rout == float("inf")).any())
    with torch.no_grad():
        out_inf = OURS[nd](x, **kw)
    out, idx = OURS[nd](x.clone().requires_grad_(), return_indices=True, **kw)
    for o in (out_inf, out.detach()):
        assert torch.equal(torch.isnan(o), nan)
        assert torch.equal(o[~nan].float(), rout[~nan])
    assert torch.equal(idx, ridx)
    x = torch.tensor([[1, 3, 2, 9], [5, 6, 1, 7], [4, 2, 8, 6], [3, 5, 7, 2]], dtype=torch.float32, device=device)
    out = tpf.max_pool2d(x[None, None], kernel_size=2, stride=2)
    assert out.tolist() == [[[[6.0, 9.0], [5.0, 8.0]]]]
    out = tpf.max_pool2d(x[None], kernel_size=2, stride=2)  # unbatched
    assert out.tolist() == [[[6.0, 9.0], [5.0, 8.0]]]


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=4, stride=2, padding=2, dilation=2)])
def test_backward_deterministic(device, rng, nd, kw):
    """Overlapping windows: two backward runs are bit-identical (and match torch)."""
    shape = (2, 8, 48, 48) if nd == 2 else (2, 4, 12, 24, 24)
    x = make_input(shape, torch.float32, device, "contiguous", rng, kind="ties")
    check_backward_deterministic(lambda t: OURS[nd](t, **kw), lambda t: TORCH[nd](t, **kw), x, rng,
                                 reference_device="cpu")


@pytest.mark.parametrize(
    "nd,kw,layout",
    [
        (1, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), "contiguous"),
        (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2)), "contiguous"),
        (2, dict(kernel_size=3, stride=2, padding=1), "channels_last"),
        (3, dict(kernel_size=2, stride=1, ceil_mode=True), "contiguous"),
        (3, dict(kernel_size=3, stride=2, padding=1), "channels_last"),
    ],
)
def test_gradcheck(device, rng, nd, kw, layout):
    shape = {1: (2, 2, 9), 2: (2, 2, 7, 6), 3: (1, 2, 5, 4, 5)}[nd]
    x = make_input(shape, torch.float64, device, layout, rng, kind="distinct").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: OURS[nd](t, **kw), (x,))
    assert torch.autograd.gradcheck(lambda t: OURS[nd](t, return_indices=True, **kw)[0], (x,))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("channels", [3, 5])
def test_window_entirely_in_padding(device, nd, channels):
    """With dilation a window can miss the input (torch allows it): -inf out, and no gradient.
    With 10 planes of a few cells the CPU's eight-planes-a-vector path is asked first and must
    leave such windows to the general path."""
    shape = (2, channels) + (4,) * (nd - 1) + (1,)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(kernel_size=2, stride=1, padding=1, dilation=2)
    out, grad, _ = run_fwd_bwd(lambda t: OURS[nd](t, **kw), x, gen=torch.Generator().manual_seed(1))
    assert_close(out, TORCH[nd](x, **kw), exact=True)
    assert bool((out == float("-inf")).all())
    assert torch.equal(grad, torch.zeros_like(x))


# Planes of at most 64 cells with output rows under 8 wide, 8 planes or more: the CPU takes them
# eight planes a vector. Plane counts that leave a partial last block, plane sizes that are and are
# not whole vectors, windows with padding, dilation and ceil mode (the last window clipped).
TINY_PLANE_CASES = [
    ((2, 9, 7), dict(kernel_size=2)),
    ((3, 5, 13), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 4, 12), dict(kernel_size=3, stride=2, padding=1, dilation=2)),
    ((2, 4, 3, 3), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 4, 2, 2), dict(kernel_size=2)),
    ((1, 8, 8, 8), dict(kernel_size=2)),
    ((2, 13, 5, 7), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 13, 5, 7), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True)),
    ((3, 7, 4, 4), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ((2, 5, 3, 3, 3), dict(kernel_size=2, stride=1, padding=1)),
    ((1, 9, 4, 2, 4), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties"])
@pytest.mark.parametrize("shape,kw", TINY_PLANE_CASES)
def test_tiny_planes(device, rng, shape, kw, kind, dtype):
    """Many tiny planes (1d to 3d): values, indices and gradients as torch's; with ties several
    windows send their gradient to one cell."""
    x = make_input(shape, dtype, device, "contiguous", rng, kind=kind)
    check_parity(x, len(shape) - 2, kw, rng, reference_device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,kw", TINY_PLANE_CASES)
def test_tiny_planes_nan_inf_signed_zeros(device, rng, shape, kw, dtype):
    """Tiny planes holding NaNs, planes of -inf only, and planes of zeros of both signs (torch keeps
    the first of equal values, so a window's sign is its first cell's): outputs bit for bit and
    indices as torch's (in the same dtype), and the gradient at torch's index."""
    nd = len(shape) - 2
    x = -(torch.rand(shape, generator=rng) + 0.5)
    flat = x.view(shape[0] * shape[1], -1)
    cells = flat.shape[1]
    signs = torch.randint(0, 2, flat[0::2].shape, generator=rng).bool()
    signs[0::2, 0], signs[1::2, 0] = True, False  # the first cells' signs alternate
    flat[0::2] = torch.where(signs, torch.tensor(-0.0), torch.tensor(0.0))  # zeros of both signs
    flat[3::8] = float("-inf")
    flat[1::4, 1] = float("nan")
    x = x.to(dtype).to(device)
    rout, ridx = TORCH[nd](x.cpu(), return_indices=True, **kw)
    assert bool(torch.isnan(rout).any()) and bool((rout == float("-inf")).any())
    zero = rout == 0
    assert bool(torch.signbit(rout[zero]).any()) and not bool(torch.signbit(rout[zero]).all())
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    nan = torch.isnan(rout)
    for grad in (False, True):
        xg = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out, idx = OURS[nd](xg, return_indices=True, **kw)
        out, idx = out.cpu(), idx.cpu()
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out.detach()[~nan].view(bits), rout[~nan].view(bits))
        assert torch.equal(idx, ridx)
        if grad:
            g = torch.rand(out.shape, generator=rng).to(dtype) + 1
            out.backward(g)
            want = torch.zeros(shape[0] * shape[1], cells, dtype=torch.float32)
            want.scatter_add_(1, ridx.reshape(shape[0] * shape[1], -1), g.float().reshape(shape[0] * shape[1], -1))
            assert_close(xg.grad.cpu().reshape(want.shape), want.to(dtype), dtype)


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((1, 2, 20, 19), dict(kernel_size=16, stride=1)),  # 256 cells: the last one-byte position
        ((1, 2, 20, 19), dict(kernel_size=17, stride=2, padding=3)),  # 289 cells: wider positions
        ((1, 2, 9, 10, 8), dict(kernel_size=7, stride=1, padding=(3, 2, 1))),  # 343 cells
        ((2, 3, 400), dict(kernel_size=300, stride=7, padding=100, ceil_mode=True)),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_wide_windows(device, rng, shape, kw, layout):
    if layout == "channels_last" and len(shape) == 3:
        layout = "permuted"
    x = make_input(shape, torch.float32, device, layout, rng, kind="distinct")
    check_parity(x, len(shape) - 2, kw, rng)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True)])
def test_larger_inputs(device, rng, layout, kw):
    """Sizes that do not divide evenly into the kernels' work chunks; many channels."""
    for shape in ((3, 37, 29, 31), (2, 19, 9, 13, 11)):
        x = make_input(shape, torch.float32, device, layout, rng, kind="distinct")
        check_parity(x, len(shape) - 2, kw, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2)])
@pytest.mark.parametrize("shape", [(1, 1, 23, 29), (1, 2, 300, 260), (2, 1, 9, 130, 70)])
def test_backward_large_and_single_planes(device, rng, shape, kw, dtype):
    """The CPU backward builds planes of up to 256 KB whole in cache; it gathers per input row for
    larger planes, or when there are fewer planes than threads. These shapes take the gather
    (3x3 windows, and the single plane), or the direct tile writes (2x2 on the large planes)."""
    x = make_input(shape, dtype, device, "contiguous", rng, kind="distinct")
    check_parity(x, len(shape) - 2, kw, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties"])
@pytest.mark.parametrize(
    "shape, kw",
    [
        ((2, 3, 12, 113), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 3, 7, 103), dict(kernel_size=2, stride=1)),
        ((2, 3, 6, 99), dict(kernel_size=3, stride=1, padding=1, ceil_mode=True)),
        ((2, 3, 9, 60), dict(kernel_size=3, stride=1)),
    ],
)
def test_backward_wide_rows(device, rng, shape, kw, kind, dtype):
    """Planes that fit in cache, with rows of 48 outputs or more: the CPU builds each input row's
    gradient in registers from the 1 to 3 output rows over it, chunks clipped at both row ends
    and a ragged last chunk (the half types convert those through a stack row)."""
    x = make_input(shape, dtype, device, "contiguous", rng, kind=kind)
    check_parity(x, 2, kw, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["distinct", "ties"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=2),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=2, stride=1),
        dict(kernel_size=5, stride=2, padding=2),
        dict(kernel_size=4, stride=1, padding=1, ceil_mode=True),
        dict(kernel_size=7, stride=2, padding=3),
    ],
)
def test_backward_windows_one_row_high(device, rng, kw, kind, dtype):
    """1d windows, and 1 x k windows in 2d, over rows of many 8-output chunks and a ragged end:
    the CPU builds each input row's gradient in registers, carrying the lanes that overlapping
    windows send into the next chunk. With ties several outputs send their gradient to one cell
    (torch's first-maximum rule picks which)."""
    for shape in ((2, 3, 1029), (1, 2, 83)):
        x = make_input(shape, dtype, device, "contiguous", rng, kind=kind)
        check_parity(x, 1, kw, rng, reference_device="cpu")
    k2 = dict(kw, kernel_size=(1, kw["kernel_size"]), stride=(1, kw["stride"]),
              padding=(0, kw.get("padding", 0)))
    x = make_input((2, 2, 5, 301), dtype, device, "contiguous", rng, kind=kind)
    check_parity(x, 2, k2, rng, reference_device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", ROW_END_WINDOWS)
def test_backward_row_ends(device, rng, kw, dtype):
    """Rows of every width from 1 to 40 cells, at stride 1 and 2 and with padding: the CPU writes
    a row's gradient in chunks of 8 * stride cells, whole vectors where the row holds one (the
    first chunk also writing into the second's cells, the last rewriting cells of the one before
    to end at the row's end) and masked stores in narrower rows."""
    for width in row_end_widths(kw):
        x = make_input((2, 3, width), dtype, device, "contiguous", rng, kind="distinct")
        check_parity(x, 1, kw, rng, reference_device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties", "nan", "signed_zeros"])
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 3, 37), dict(kernel_size=2)),
        ((4, 8, 26, 26), dict(kernel_size=2)),
        ((2, 3, 9, 35), dict(kernel_size=(3, 2), stride=(1, 2))),
        ((2, 3, 11, 40), dict(kernel_size=2, stride=(3, 2), dilation=(4, 1))),
        ((2, 3, 7, 9, 33), dict(kernel_size=2)),
        ((2, 2, 6, 7, 18), dict(kernel_size=(2, 1, 2), stride=(1, 1, 2))),
        ((2, 3, 8, 21), dict(kernel_size=2, ceil_mode=True)),
    ],
)
def test_two_wide_windows_inside_the_input(device, rng, shape, kw, kind, dtype):
    """Windows two wide at W stride 2, all inside the input, over rows of 8 outputs or more (the
    last chunk overlapping the one before): the CPU takes a walk of its own for them, reducing each
    window row with one `max` and folding the rows in scan order, and redoes chunks holding a NaN
    by torch's rule. Ties keep the first cell (of +0 and -0 too); a NaN wins, the last one for the
    index. The last case has a window past the end (ceil_mode), which the walk leaves to the
    general one."""
    nd = len(shape) - 2
    if kind == "signed_zeros":  # only zeros and negatives: the indices pick among equal zeros
        sign = torch.randint(0, 2, shape, generator=rng).bool()
        zeros = torch.where(sign, torch.tensor(-0.0), torch.tensor(0.0))
        x = torch.where(torch.rand(shape, generator=rng) < 0.6, zeros, -torch.rand(shape, generator=rng) - 0.5)
        x = x.to(dtype=dtype, device=device)
        with torch.no_grad():
            rout, ridx = TORCH[nd](x.float(), return_indices=True, **kw)
            assert bool(torch.signbit(rout[rout == 0]).any())
            out, idx = OURS[nd](x, return_indices=True, **kw)
            assert torch.equal(idx, ridx)
            for o in (out, OURS[nd](x, **kw)):
                assert torch.equal(o.float(), rout)
                assert torch.equal(torch.signbit(o), torch.signbit(rout))
        return
    x = make_input(shape, dtype, device, "contiguous", rng, kind="ties" if kind == "nan" else kind)
    if kind == "nan":
        x.view(-1)[torch.randperm(x.numel(), generator=rng)[: x.numel() // 40]] = float("nan")
    check_parity(x, nd, kw, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties", "nan", "signed_zeros", "minus_inf"])
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 3, 9, 16), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 3, 13, 33), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 3, 12, 34), dict(kernel_size=3, stride=2)),
        ((3, 4, 57), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 3, 11, 36), dict(kernel_size=3, stride=(1, 2), padding=1, dilation=(2, 1))),
        ((2, 2, 5, 7, 40), dict(kernel_size=(3, 1, 3), stride=(1, 2, 2), padding=(1, 0, 1))),
        ((2, 3, 9, 34), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ],
)
def test_three_wide_windows_at_stride_two(device, rng, shape, kw, kind, dtype):
    """Windows three wide at W stride 2 (resnet's stem pool) with at most one padded column, and
    1 or 3 window rows: the CPU takes a walk of its own for them (float32, float16 converted,
    and bfloat16, whose cells it takes two to a 32-bit lane), with the padded rows and the padded first column
    replaced by repeats of cells inside the input. Those repeats must not change the value (+0 and
    -0 too), the index (ties keep the first cell, a NaN wins, the last one for the index), nor the
    windows entirely -inf (the index is the first cell inside the input). The last case has a
    window past the end (ceil_mode), which goes to the general walk."""
    nd = len(shape) - 2
    if kind in ("signed_zeros", "minus_inf"):
        fill = torch.where(torch.randint(0, 2, shape, generator=rng).bool(), torch.tensor(-0.0),
                           torch.tensor(0.0)) if kind == "signed_zeros" else torch.tensor(float("-inf"))
        x = torch.where(torch.rand(shape, generator=rng) < 0.6, fill, -torch.rand(shape, generator=rng) - 0.5)
        x = x.to(dtype=dtype, device=device)
        with torch.no_grad():
            rout, ridx = TORCH[nd](x.float(), return_indices=True, **kw)
            out, idx = OURS[nd](x, return_indices=True, **kw)
            assert torch.equal(idx, ridx)
            for o in (out, OURS[nd](x, **kw)):
                assert torch.equal(o.float(), rout)
                assert torch.equal(torch.signbit(o), torch.signbit(rout))
        if kind == "signed_zeros":
            assert bool(torch.signbit(rout[rout == 0]).any()) and not bool(torch.signbit(rout[rout == 0]).all())
        else:
            assert bool(torch.isinf(rout).any())
        return
    x = make_input(shape, dtype, device, "contiguous", rng, kind="ties" if kind == "nan" else kind)
    if kind == "nan":
        x.view(-1)[torch.randperm(x.numel(), generator=rng)[: x.numel() // 40]] = float("nan")
    check_parity(x, nd, kw, rng)
    if dtype != torch.float32:  # check_parity asks of half types' indices only that they point at a maximum
        with torch.no_grad():
            assert torch.equal(OURS[nd](x, return_indices=True, **kw)[1],
                               TORCH[nd](x.float(), return_indices=True, **kw)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 3, 21, 40), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 3, 20, 34), dict(kernel_size=3, stride=2)),
        ((1, 2, 22, 17), dict(kernel_size=3, stride=2, padding=1)),
    ],
)
def test_three_wide_windows_rows_shared(device, rng, shape, kw, dtype):
    """3 x 3 windows at stride 2: an output row's last window row is the next output row's first,
    and the CPU's inference keeps that row's three-cell maxima for the next output row when the
    row holds no NaN. One NaN in a shared row of every other plane, so the output rows on both
    sides of it must show it and the rest of the plane must not; planes end and begin with rows
    kept (no padding) and not (padding), rows of 8 to 20 outputs (the last chunk overlapping the
    one before it). Values, indices and gradients against torch, in inference and training."""
    pad = kw.get("padding", 0)
    x = make_input(shape, dtype, device, "contiguous", rng, kind="distinct")
    H, W = shape[2], shape[3]
    shared = list(range(2 - pad, H - 1, 2))  # input rows that two output rows read
    flat = x.view(-1, H, W)
    for p in range(0, flat.shape[0], 2):
        h = shared[int(torch.randint(len(shared), (1,), generator=rng))]
        flat[p, h, int(torch.randint(W, (1,), generator=rng))] = float("nan")
    with torch.no_grad():
        rout = F.max_pool2d(x.float(), **kw)
        assert int(torch.isnan(rout).sum()) >= 2 * len(range(0, flat.shape[0], 2))
    check_parity(x, 2, kw, rng)


@pytest.mark.parametrize(
    "shape", [(3, 4, 33), (2, 3, 17, 19), (4, 8, 26, 26), (2, 2, 7, 9, 21), (2, 3, 5, 201), (2, 2, 5, 4, 131)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_tiling_windows(device, rng, shape, dtype):
    """2-wide windows that tile the input (kernel == stride, no padding): each input cell gets one
    output's gradient or 0, so the gradient equals torch's bit for bit, including the cells past
    the last window along each dim (odd sizes) and NaN gradients (bfloat16 moves the gradient's
    bits without converting them; a NaN becomes the NaN torch's float round trip makes; float16
    NaNs are checked for place, not payload). Rows of 384 bytes or more (the last two shapes) are
    written one after the other, shorter ones chunk by chunk across them."""
    nd = len(shape) - 2
    x = make_input(shape, dtype, device, "contiguous", rng, kind="distinct")
    with torch.no_grad():
        g = torch.randn(OURS[nd](x, 2).shape, generator=rng).to(dtype=dtype, device=device)
        g.view(-1)[torch.randperm(g.numel(), generator=rng)[: max(1, g.numel() // 30)]] = float("nan")
        if dtype != torch.float32:  # NaNs of other signs and payloads
            bits = g.view(torch.int16).view(-1)
            bits[:3] = torch.tensor([0x7F81, -0x3F, 0x7FC1] if dtype == torch.bfloat16 else [0x7C01, -0x3FF, 0x7E01])
    out, grad, _ = run_fwd_bwd(lambda t: OURS[nd](t, 2), x, g=g)
    rout, rgrad, _ = run_fwd_bwd(lambda t: TORCH[nd](t, 2), x, g=g)
    assert torch.equal(out, rout)
    assert bool(torch.isnan(rgrad).any())
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    if dtype == torch.float16:
        # NaN payloads: the portable (non-AVX2) kernels keep a float16 NaN's payload where torch
        # quiets it to 0x7E00; values and NaN places must still match.
        nan = torch.isnan(rgrad)
        assert torch.equal(torch.isnan(grad), nan)
        assert torch.equal(grad.view(bits)[~nan], rgrad.view(bits)[~nan])
    else:
        assert torch.equal(grad.view(bits), rgrad.view(bits))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_with_strided_grad_output(device, rng, nd, layout):
    """out.sum().backward() passes an expanded (stride 0) gradient; a transposed one is not dense
    in the output's layout either."""
    if layout == "channels_last" and nd == 1:
        layout = "permuted"
    x = make_input(SHAPES[nd], torch.float32, device, layout, rng, kind="distinct")
    kw = dict(kernel_size=3, stride=2, padding=1)
    check_strided_grad_outputs(lambda t: OURS[nd](t, **kw), lambda t: TORCH[nd](t, **kw), x, rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_inference_mode(device, rng, nd):
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng, kind="distinct")
    with torch.inference_mode():
        out = OURS[nd](x, 3, 2, 1)
        out2, idx = OURS[nd](x, 3, 2, 1, return_indices=True)
    rout, ridx = TORCH[nd](x, 3, 2, 1, return_indices=True)
    assert_close(out, rout, exact=True)
    assert_close(out2, rout, exact=True)
    assert torch.equal(idx, ridx)


@pytest.mark.parametrize("tune", ["intel", "amd"])
def test_cpu_tunings_channels_last(device, tune):
    """Each vendor tuning of the CPU kernels (TORCHPOOL_CPU_TUNE=intel or amd: the channels-last
    training forward's positions by and + integer max or by a blend) passes this file's
    channels-last and tie tests, whichever CPU runs them."""
    if device != "cpu":
        pytest.skip("the tunings are the CPU kernels'")
    assert_tests_pass_with("test_max_pool.py", "(channels_last or ties) and not tunings", TORCHPOOL_CPU_TUNE=tune)
