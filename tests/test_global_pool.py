"""Global max / average pooling: parity with torch reductions (values and gradients), keepdim,
unbatched, empty batches, layouts, NaN, ties (gradient to the first maximum), gradcheck; the
CPU kernels' vendor tunings."""
import os
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import torchpool.functional as tpf
from conftest import (
    DTYPES,
    HYPOTHESIS,
    ND_LAYOUTS,
    assert_close,
    assert_tests_pass_with,
    channels_last_format,
    check_strided_grad_outputs,
    draw_dtype_layout,
    layouts_for,
    make_input,
    python_with,
    ref_dtype,
    run_fwd_bwd,
    to_layout,
)

ops = torch.ops.torchpool

GMAX = {1: tpf.global_max_pool1d, 2: tpf.global_max_pool2d, 3: tpf.global_max_pool3d}
GAVG = {1: tpf.global_avg_pool1d, 2: tpf.global_avg_pool2d, 3: tpf.global_avg_pool3d}
SHAPES = {1: (2, 3, 50), 2: (2, 3, 7, 9), 3: (2, 3, 4, 5, 6)}


def spatial_dims(x, nd):
    return tuple(range(x.dim() - nd, x.dim()))


def ref_max(x, nd, keepdim):
    return x.amax(dim=spatial_dims(x, nd), keepdim=keepdim)


def ref_avg(x, nd, keepdim):
    return x.mean(dim=spatial_dims(x, nd), keepdim=keepdim)


def ref_max_grad(x, g, nd):
    """Gradient of a global max that sends everything to the first maximum in scan order."""
    flat = x.reshape(*x.shape[: x.dim() - nd], -1)
    idx = flat.argmax(-1, keepdim=True)
    g = g.reshape(*flat.shape[:-1], 1)
    return torch.zeros_like(flat).scatter(-1, idx, g).reshape(x.shape)


def check_max(x, nd, keepdim, gen):
    dtype, rd = x.dtype, ref_dtype(x.dtype)
    with torch.no_grad():
        out_inf = GMAX[nd](x, keepdim=keepdim)
    out, grad, g = run_fwd_bwd(lambda t: GMAX[nd](t, keepdim=keepdim), x, gen=gen)
    xr = x.detach().to(device="cpu", dtype=rd)
    rout = ref_max(xr, nd, keepdim).to(dtype)
    rgrad = ref_max_grad(xr, g.detach().cpu().to(rd), nd).to(dtype)
    assert out.device == x.device
    assert_close(out_inf.cpu(), rout, exact=True, equal_nan=True)
    assert_close(out.cpu(), rout, exact=True, equal_nan=True)
    assert_close(grad.cpu(), rgrad, exact=True)
    return out, grad


def check_avg(x, nd, keepdim, gen):
    dtype, rd = x.dtype, ref_dtype(x.dtype)
    with torch.no_grad():
        out_inf = GAVG[nd](x, keepdim=keepdim)
    out, grad, g = run_fwd_bwd(lambda t: GAVG[nd](t, keepdim=keepdim), x, gen=gen)
    rout, rgrad, _ = run_fwd_bwd(lambda t: ref_avg(t, nd, keepdim), x.to(rd), g=g.to(rd))
    assert out.device == x.device
    assert_close(out_inf, rout.to(dtype), dtype)
    assert_close(out, rout.to(dtype), dtype)
    assert_close(grad, rgrad.to(dtype), dtype)
    return out, grad


GRID = [(nd, dtype, layout) for nd in (1, 2, 3) for dtype in DTYPES for layout in layouts_for(nd + 2)]


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("nd,dtype,layout", GRID)
@pytest.mark.parametrize("check,kind", [(check_max, "distinct"), (check_avg, "positive")], ids=["max", "avg"])
def test_global_matches_torch(device, rng, check, kind, nd, dtype, layout, keepdim):
    x = make_input(SHAPES[nd], dtype, device, layout, rng, kind=kind)
    out, _ = check(x, nd, keepdim, rng)
    assert out.shape == ((2, 3) + (1,) * nd if keepdim else (2, 3))


@st.composite
def global_cases(draw):
    nd = draw(st.integers(1, 3))
    sizes = tuple(draw(st.integers(1, {1: 40, 2: 12, 3: 6}[nd])) for _ in range(nd))
    batched = draw(st.sampled_from([True, True, True, False]))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    shape = ((n, c) if batched else (c,)) + sizes
    return dict(
        nd=nd,
        **draw_dtype_layout(draw, shape, batched),
        keepdim=draw(st.booleans()),
        kind=draw(st.sampled_from(["distinct", "ties", "randn"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@HYPOTHESIS
@given(case=global_cases())
def test_global_pools_hypothesis(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_input(case["shape"], case["dtype"], device, case["layout"], gen, kind=case["kind"])
    check_max(x, case["nd"], case["keepdim"], gen)
    avg_kind = "randn" if case["kind"] == "randn" else "positive"
    x = make_input(case["shape"], case["dtype"], device, case["layout"], gen, kind=avg_kind)
    check_avg(x, case["nd"], case["keepdim"], gen)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("keepdim", [False, True])
def test_unbatched(device, rng, nd, keepdim):
    x = make_input(SHAPES[nd][1:], torch.float32, device, "contiguous", rng, kind="distinct")
    out, _ = check_max(x, nd, keepdim, rng)
    assert out.shape == ((3,) + (1,) * nd if keepdim else (3,))
    out, _ = check_avg(x, nd, keepdim, rng)
    assert out.shape == ((3,) + (1,) * nd if keepdim else (3,))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("keepdim", [False, True])
def test_empty_batch(device, nd, keepdim):
    for fn in (GMAX[nd], GAVG[nd]):
        x = torch.randn((0,) + SHAPES[nd][1:], device=device, requires_grad=True)
        out = fn(x, keepdim=keepdim)
        assert out.shape == ((0, 3) + (1,) * nd if keepdim else (0, 3))
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("nd", [2, 3])
def test_large_plane(device, rng, nd):
    shape = (2, 4, 96, 96) if nd == 2 else (2, 4, 16, 24, 24)
    x = make_input(shape, torch.float32, device, "contiguous", rng, kind="positive")
    check_avg(x, nd, False, rng)
    check_max(x, nd, False, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_backward_split_between_threads(device, rng, dtype, layout):
    """Enough planes for several tasks on two threads, each zeroing only its own range: the
    whole gradient matches torch's, also where the gradient's memory held other values before."""
    x = make_input((4, 96, 24, 24), dtype, device, layout, rng)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_fwd_bwd(tpf.global_avg_pool2d, x, gen=rng)  # a gradient of nonzeros, then freed
        check_max(x, 2, False, rng)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("nd", [2, 3])
def test_grad_layout_preserved(device, rng, nd):
    fmt = channels_last_format(nd + 2)
    x = make_input(SHAPES[nd], torch.float32, device, "channels_last", rng, kind="distinct")
    for fn in (GMAX[nd], GAVG[nd]):
        _, grad, _ = run_fwd_bwd(fn, x, gen=rng)
        assert grad.is_contiguous(memory_format=fmt)


def test_keras_worked_example(device):
    x = torch.tensor([[1, 3, 2, 9], [5, 6, 1, 7], [4, 2, 8, 6], [3, 5, 7, 2]], dtype=torch.float32, device=device)
    assert tpf.global_max_pool2d(x[None, None]).tolist() == [[9.0]]
    assert tpf.global_avg_pool2d(x[None, None]).tolist() == [[4.4375]]
    assert tpf.global_max_pool2d(x[None, None], keepdim=True).tolist() == [[[[9.0]]]]
    assert tpf.global_avg_pool2d(x[None], keepdim=True).tolist() == [[[4.4375]]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(device, dtype):
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 1, 4, 5] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    x = x.to(device)
    out = tpf.global_max_pool2d(x)
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[0, 1] = expected[1, 2] = True
    assert torch.equal(torch.isnan(out).cpu(), expected)
    assert_close(out.cpu(), x.float().amax(dim=(2, 3)).to(dtype).cpu(), exact=True, equal_nan=True)
    assert bool(torch.isnan(tpf.global_avg_pool2d(x)).cpu().eq(expected).all())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_gradient_to_first_maximum(device, layout):
    x = torch.tensor([[[[1.0, 4.0, 2.0], [4.0, 0.0, 4.0]], [[-1.0, -1.0, -3.0], [-1.0, -2.0, -1.0]]]])
    x = x.to(device).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    out, grad, _ = run_fwd_bwd(tpf.global_max_pool2d, x, g=torch.tensor([[2.0, 3.0]], device=device))
    assert out.tolist() == [[4.0, -1.0]]
    assert grad.tolist() == [[[[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]]


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
def test_gradcheck(device, rng, nd, keepdim, layout):
    shape = {1: (2, 3, 7), 2: (2, 3, 4, 5), 3: (2, 2, 3, 4, 3)}[nd]
    x = make_input(shape, torch.float64, device, layout, rng, kind="distinct").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: GMAX[nd](t, keepdim=keepdim), (x,))
    assert torch.autograd.gradcheck(lambda t: GAVG[nd](t, keepdim=keepdim), (x,))


@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
def test_ops_carry_their_autograd(device, rng, nd, layout):
    """The global ops and their backward ops are differentiable as they are (autograd registered
    in C++): gradcheck and gradgradcheck of each op called directly, in float64; no graph where no
    gradient is wanted."""
    shape = {1: (2, 3, 7), 2: (2, 3, 4, 5), 3: (2, 2, 3, 4, 3)}[nd]
    x = make_input(shape, torch.float64, device, layout, rng, kind="distinct").requires_grad_()
    g = torch.randn(shape[:2], generator=rng, dtype=torch.float64).to(device).requires_grad_()
    cl = layout == "channels_last"
    _, pos = ops.global_max_pool_with_pos(x.detach())
    calls = [(ops.global_max_pool, x), (lambda t: ops.global_max_pool_with_pos(t)[0], x),
             (ops.global_avg_pool, x),
             (lambda t: ops.global_max_pool_backward(t, pos, list(shape), cl), g),
             (lambda t: ops.global_avg_pool_backward(t, list(shape), cl), g)]
    for fn, arg in calls:
        assert torch.autograd.gradcheck(fn, (arg,))
        assert torch.autograd.gradgradcheck(fn, (arg,))
        assert fn(arg).grad_fn is not None
        assert fn(arg.detach()).grad_fn is None
        with torch.no_grad():
            assert fn(arg).grad_fn is None


@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
def test_backward_with_strided_grad_output(device, rng, nd, layout):
    """out.sum().backward() passes an expanded (stride 0) gradient; a sliced one is not dense."""
    x = make_input(SHAPES[nd], torch.float32, device, layout, rng, kind="distinct")
    check_strided_grad_outputs(GMAX[nd], lambda t: ref_max(t, nd, False), x, rng)
    check_strided_grad_outputs(GAVG[nd], lambda t: ref_avg(t, nd, False), x, rng)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_inference_mode(device, rng, nd):
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng, kind="distinct")
    with torch.inference_mode():
        out_max, out_avg = GMAX[nd](x), GAVG[nd](x, keepdim=True)
    assert_close(out_max, ref_max(x, nd, False), exact=True)
    assert_close(out_avg, ref_avg(x, nd, True))


def _general_path_refused(*args):
    raise AssertionError("the general path was taken")


@pytest.mark.parametrize("nd,layout", ND_LAYOUTS)
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_common_calls_take_the_short_path(device, rng, monkeypatch, nd, layout, train):
    """A plain batched tensor with no empty dim skips the general argument handling; keepdim,
    unbatched inputs, tensor subclasses, empty batches and bad inputs still take it."""
    x = make_input(SHAPES[nd], torch.float32, device, layout, rng, kind="distinct")
    x.requires_grad_(train)
    monkeypatch.setattr(tpf, "_global_pool", _general_path_refused)
    for pool, ref in ((GMAX[nd], ref_max), (GAVG[nd], ref_avg)):
        out = pool(x)
        assert out.requires_grad == train
        if train:  # the op's own autograd node, built in C++, not a Python Function's
            assert out.grad_fn.name().startswith("torch::autograd::CppNode<torchpool::")
        assert_close(out.detach(), ref(x.detach(), nd, False), exact=ref is ref_max)
        if train:
            g = torch.randn(out.shape, generator=rng).to(device)
            (grad,) = torch.autograd.grad(out, x, g)
            if ref is ref_max:
                want_grad = ref_max_grad(x.detach(), g, nd)
            else:
                (want_grad,) = torch.autograd.grad(ref(x, nd, False), x, g)
            assert_close(grad, want_grad, exact=ref is ref_max)
            assert grad.is_contiguous(memory_format=channels_last_format(x.dim()) if
                                      layout == "channels_last" else torch.contiguous_format)
        others = [lambda: pool(x, keepdim=True), lambda: pool(x[0]),
                  lambda: pool(torch.nn.Parameter(x.detach())), lambda: pool(x[:0]),
                  lambda: pool(x.detach().to(torch.int32))]
        for call in others:
            with pytest.raises(AssertionError, match="general path"):
                call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "cells", [(1, 1), (1, 3), (2, 4), (1, 8), (3, 3), (4, 4), (7, 7), (5, 10), (15, 17), (16, 16)]
)
@pytest.mark.parametrize("planes", [8, 15, 43])
def test_avg_of_many_short_planes(device, rng, cells, planes, dtype):
    """Planes of 1–256 cells reduced eight at a time (whole groups and a remainder; the half
    types from 8 cells on, their last partial vector loaded as the plane's last 8 cells with the
    lanes already summed zeroed), against the float64 mean; values far from zero so that a
    dropped or doubled cell shows (one cell is 2 % of a 49-cell mean, more than the one rounding
    of a half-type result allows)."""
    x = (torch.rand((planes,) + cells, generator=rng) + 1.0).reshape(1, planes, *cells).to(device, dtype)
    out = tpf.global_avg_pool2d(x)
    ref = x.double().mean(dim=(2, 3))
    if dtype == torch.float32:
        assert_close(out, ref.float(), torch.float32)
    else:  # the float sum divided and rounded once: within one unit in the last place
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert bool(((out.double() - ref).abs() <= ulp * ref.abs()).all())
    assert float(out.min()) > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_planes_of_one_cell(device, rng, kind, nd, dtype):
    """Planes of a single cell, in every layout (the CPU copies them, forward and backward, in
    either layout): each result is its cell, each gradient its plane's, to the bit, against torch's
    adaptive pools. 3 x 7000 planes, so the work is split; NaN, ±inf and ±0 among the cells, and an
    upstream gradient that is not dense."""
    shape = (3, 7000) + (1,) * nd
    x = torch.randn(shape, generator=rng)
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e30])
    flat[-1] = float("nan")
    pool = (GMAX if kind == "max" else GAVG)[nd]
    adaptive = getattr(F, f"adaptive_{kind}_pool{nd}d")
    for layout in layouts_for(x.dim()):
        xl = to_layout(x.to(device, dtype), layout)
        with torch.no_grad():
            out_inf = pool(xl)
        out, grad, g = run_fwd_bwd(pool, xl, gen=rng)
        rout, rgrad, _ = run_fwd_bwd(lambda t: adaptive(t, 1).flatten(1), xl, g=g)
        expected = xl.detach().reshape(3, 7000)
        for o in (out_inf, out, rout):
            assert_close(o, expected, exact=True, equal_nan=True)
        assert_close(grad, g.reshape(shape), exact=True)
        assert_close(grad, rgrad, exact=True)
        check_strided_grad_outputs(pool, lambda t: adaptive(t, 1).flatten(1), xl, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(2, 37, 5, 3), (3, 2048, 7, 7), (1, 100, 2, 2), (2, 24, 1, 3), (2, 19, 3, 3, 3)]
)
def test_avg_channels_last_rows(device, rng, shape, dtype):
    """Channels-last global averages: the CPU adds four rows of channels at a time, then the last
    1 to 3 one by one; channel counts off multiples of 8 and 16, and channel blocks narrower than a
    row (3 x 2048 channels are split into tasks of 512). Against the float64 mean, values far from
    zero so that a dropped or doubled row shows."""
    nd = len(shape) - 2
    x = (torch.rand(shape, generator=rng) + 1.0).to(device, dtype).contiguous(
        memory_format=channels_last_format(len(shape)))
    ref = x.double().mean(dim=tuple(range(2, len(shape))))
    for out in (GAVG[nd](x), GAVG[nd](x.detach().requires_grad_()).detach()):
        if dtype == torch.float32:
            assert_close(out, ref.float(), torch.float32)
        else:  # the float sum divided and rounded once: within one unit in the last place
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            assert bool(((out.double() - ref).abs() <= ulp * ref.abs()).all())


def global_max_against_torch(x, train, rng):
    """Our global max of x (1, planes, *cells), in training or inference, and torch's
    adaptive_max_pool of it (in x's dtype, shaped as ours); in training the gradient must reach
    the cell torch picks (its index) in every plane."""
    nd, planes = x.dim() - 2, x.shape[1]
    with torch.set_grad_enabled(train):
        leaf = x.detach().requires_grad_(train)
        out = GMAX[nd](leaf)
    with torch.no_grad():
        ref, idx = getattr(F, f"adaptive_max_pool{nd}d")(x.float(), 1, return_indices=True)
        ref = ref.reshape(1, planes).to(x.dtype)
    if train:
        g = torch.rand(out.shape, generator=rng).to(x.device, x.dtype) + 1.0
        out.backward(g)
        want = torch.zeros((1, planes, x[0, 0].numel()), dtype=x.dtype, device=x.device)
        want.scatter_(2, idx.reshape(1, planes, 1), g.reshape(1, planes, 1))
        assert torch.equal(leaf.grad.reshape(want.shape), want)
    return out, ref


def assert_traps_bit_exact(out, ref):
    """out is NaN where torch's ref is and equal to it bit for bit elsewhere; ref holds a NaN and a
    zero maximum, every zero -0 (the traps of the test took effect)."""
    nan = torch.isnan(ref)
    zero = ref == 0
    assert bool(nan.any()) and bool(zero.any()) and bool(torch.signbit(ref[zero]).all())
    assert torch.equal(torch.isnan(out), nan)
    bits = torch.int32 if ref.dtype == torch.float32 else torch.int16
    assert torch.equal(out[~nan].view(bits), ref[~nan].view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cells", [(1, 7), (1, 8), (3, 3), (7, 7), (14, 14), (15, 17), (16, 16), (20, 15)])
@pytest.mark.parametrize("planes", [8, 15, 43])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_max_of_many_short_planes(device, rng, cells, planes, dtype, train):
    """Global max of planes of 7–300 cells, up to 255 eight at a time (whole groups and a remainder;
    a plane's last partial vector is its last 8 cells, or under 8 its only one), against torch's
    adaptive_max_pool2d bit for bit: NaNs in some planes, and in others a zero maximum that appears
    as -0 before +0 (torch keeps the first of equal values, so the result is -0). Training: the
    gradient must reach the cell torch picks (its index), in every plane."""
    n = cells[0] * cells[1]
    x = -(torch.rand((1, planes, n), generator=rng) + 0.5)
    for p in range(0, planes, 3):  # -0 first, +0 later (16 cells apart when the plane allows)
        x[0, p, 1] = -0.0
        x[0, p, min(17, n - 1)] = 0.0
    for p in range(1, planes, 5):
        x[0, p, int(torch.randint(0, n, (1,), generator=rng))] = float("nan")
    out, ref = global_max_against_torch(x.reshape(1, planes, *cells).to(device, dtype), train, rng)
    assert_traps_bit_exact(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("planes", [7, 8, 16, 43])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_max_of_planes_under_8_cells(device, rng, n, planes, dtype, train):
    """Planes of 1 to 7 cells (a vector each, eight planes at a time; a group whose vectors would
    read past the tensor's end, and the planes after the last whole group, one by one), against
    torch's adaptive_max_pool1d bit for bit and, in training, the gradient on torch's index. Traps
    by plane: -0 before +0 (the first, -0, wins), a tie of the maximum (the first wins), a NaN,
    every cell -inf; planes of one cell hold each of those values alone."""
    x = -(torch.rand((1, planes, n), generator=rng) + 0.5)
    for p in range(planes):
        trap, cells = p % 4, torch.randperm(n, generator=rng)
        if trap == 0:  # +0 in the later of two cells, -0 in the earlier (one cell: -0 alone)
            x[0, p, max(cells[:2])] = 0.0
            x[0, p, min(cells[:2])] = -0.0
        elif trap == 1:
            x[0, p, cells[:2]] = 0.25 + p
        elif trap == 2:
            x[0, p, cells[0]] = float("nan")
        elif p % 8 == 3:
            x[0, p] = float("-inf")
    out, ref = global_max_against_torch(x.to(device, dtype), train, rng)
    assert_traps_bit_exact(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [8, 12, 16, 17, 23, 24, 40, 49, 196, 255])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_max_ties_in_short_planes(device, rng, n, dtype, train):
    """Short planes whose maximum appears in two to four cells: the first must win, wherever the
    cells sit (same or different lanes of a vector, even or odd vectors, the plane's last partial
    vector, which is loaded as its last 8 cells and so sees some cells twice), in groups of eight
    planes and a remainder; planes of -inf only and planes with a NaN among the ties. Values and
    indices against torch's adaptive_max_pool1d; in training the gradient on torch's index."""
    planes = 21
    x = -(torch.rand((1, planes, n), generator=rng) + 1.0)
    for p in range(planes):
        k = 2 + p % 3
        cells = torch.randperm(n, generator=rng)[:k]
        x[0, p, cells] = 0.5 + p  # the same value k times
    x[0, 0, :] = float("-inf")
    x[0, 1, [n - 1, n - 9 if n >= 9 else 0]] = 100.0  # a tie in the last cells
    x[0, 2, [n // 2, n - 1]] = 100.0
    x[0, 9, [0, n - 1]] = 100.0
    x[0, 10, [n - 1, 1]] = float("nan")
    out, ref = global_max_against_torch(x.to(device, dtype), train, rng)
    nan = torch.isnan(ref)
    assert bool(nan[0, 10]) and int(nan.sum()) == 1
    assert torch.equal(torch.isnan(out), nan) and torch.equal(out[~nan], ref[~nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [16, 17, 33, 64, 100, 196, 255])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_max_ties_at_lane_distances(device, rng, n, dtype, train):
    """Planes of 16 to 255 cells, one plane for every pair of cells (a, a + d) with a in
    steps of 3 and d a multiple of 8 up to 96: the maximum in both, so ties fall in the same lane
    of the same vector chain (8 or 16 lanes, even and odd vectors, the plane's first vector, the
    last partial one seen twice) and in different ones; the first cell must win. Values and
    indices against torch's adaptive_max_pool1d; in training the gradient on torch's index."""
    pairs = [(a, a + d) for d in range(8, 97, 8) for a in range(0, n - d, 3)]
    x = -(torch.rand((1, len(pairs), n), generator=rng) + 1.0)
    for p, cells in enumerate(pairs):
        x[0, p, list(cells)] = 0.5 + p
    out, ref = global_max_against_torch(x.to(device, dtype), train, rng)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4096, 4100, 4133, 6151, 8200])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_max_of_long_planes(device, rng, n, dtype, train):
    """Global max of planes of 4096 cells or more (read block by block, each lane keeping the first
    block where its largest value appeared, then the first block holding the plane's maximum
    searched for its cell), against torch's adaptive_max_pool1d bit for bit and, in training, the
    gradient on torch's index. Each plane has its own trap: equal maxima in several blocks (the
    first wins), a maximum in the last cells (also a last block shorter than 8 cells, and one of
    37), -0 in one block and +0 in a later one, two NaNs in different blocks (torch takes the
    last), a NaN in the last cells only, every cell -inf."""
    x = -(torch.rand((1, 8, n), generator=rng) + 0.5)
    x[0, 0, [3000, 100, 5000 % n]] = 2.0  # ties in three blocks; the last two share a lane for most n
    x[0, 1, n - 1] = 3.0
    x[0, 2, 2100] = -0.0
    x[0, 2, n - 5] = 0.0
    x[0, 3, [10, 3000]] = float("nan")
    x[0, 4, n - 2] = float("nan")
    x[0, 5] = float("-inf")
    x[0, 6, 2047] = 5.0  # the last cell of the first block
    x[0, 6, 2048] = 5.0
    x[0, 7, n - 9] = 4.0  # in the block before a short last one (n = 6151)
    x = x.to(device, dtype)
    with torch.set_grad_enabled(train):
        leaf = x.detach().requires_grad_(train)
        out = tpf.global_max_pool1d(leaf)
    with torch.no_grad():
        ref, idx = F.adaptive_max_pool1d(x.float().cpu(), 1, return_indices=True)
        ref = ref.reshape(1, 8).to(dtype)
    assert idx.reshape(8)[[0, 2, 3, 6]].tolist() == [100, 2100, 3000, 2047]  # the traps in place
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out.cpu()), nan)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.cpu()[~nan].view(bits), ref[~nan].view(bits))
    if train:
        g = torch.rand(out.shape, generator=rng).to(device, dtype) + 1.0
        out.backward(g)
        want = torch.zeros((1, 8, n), dtype=dtype)
        want.scatter_(2, idx.reshape(1, 8, 1), g.cpu().reshape(1, 8, 1))
        assert torch.equal(leaf.grad.cpu(), want)


def _cpuinfo(field):
    """The value of the first /proc/cpuinfo line for `field`, or None."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_vendor():
    return _cpuinfo("vendor_id")


# Three calls that each pick the CPU kernels, printing the first line of each one's error.
_THREE_CALLS = (
    "import torch, torchpool, torchpool.functional as tpf\n"
    "for call in (lambda: tpf.max_pool2d(torch.randn(1, 1, 4, 4), 2), torchpool.cpu_kernels,\n"
    "             lambda: tpf.global_avg_pool2d(torch.randn(1, 1, 4, 4))):\n"
    "    try:\n"
    "        call()\n"
    "        print('no error')\n"
    "    except RuntimeError as e:\n"
    "        print(str(e).splitlines()[0])\n"
)


def _assert_every_call_fails(message, **env):
    """With `env` set, each of _THREE_CALLS fails with an error starting with `message`."""
    r = python_with(_THREE_CALLS, **env)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stdout + r.stderr[-2000:]
    for line in lines:
        assert line.startswith(message), line


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("side,dtype,itemsize", [(1, torch.uint8, 1), (14, torch.uint8, 1), (16, torch.uint8, 1),
                                                 (17, torch.int32, 4), (60, torch.int32, 4)])
def test_max_saves_each_cell_in_the_fewest_bytes(device, rng, layout, side, dtype, itemsize):
    """Training saves each plane's maximum cell for the backward: on the CPU in the plane's
    narrowest dtype (one byte up to 256 cells, as a window's position; int32 above), on CUDA as
    int64; the gradient still reaches torch's cell."""
    x = make_input((3, 5, side, side), torch.float32, device, layout, rng, kind="distinct").requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = tpf.global_max_pool2d(x)
    cells = [t for t in saved if t.dtype in (torch.uint8, torch.int32, torch.int64)]
    assert len(cells) == 1 and cells[0].shape == (3, 5)
    if device == "cpu":
        assert cells[0].dtype == dtype and cells[0].element_size() == itemsize
    else:
        assert cells[0].dtype == torch.int64
    _, idx = F.adaptive_max_pool2d(x.detach(), 1, return_indices=True)
    assert torch.equal(cells[0].long().cpu(), idx.flatten(1).cpu())
    g = torch.rand(3, 5, generator=rng).to(device) + 1
    out.backward(g)
    want = torch.zeros(3, 5, side * side, device=device).scatter_(2, idx.flatten(2), g[..., None])
    assert torch.equal(x.grad.reshape(3, 5, -1), want)


def test_cpu_kernels_named():
    """torchpool.cpu_kernels() names the instruction set and the tuning in use; without
    TORCHPOOL_CPU_TUNE the tuning follows the CPU's vendor, and the Intel tuning on a CPU with
    AVX-512F takes the AVX2 kernels' AVX-512 parts ("avx2+avx512")."""
    import torchpool

    k = torchpool.cpu_kernels()
    assert k["isa"] in ("avx2", "avx2+avx512", "base") and k["tuning"] in ("intel", "amd")
    if "TORCHPOOL_CPU_TUNE" not in os.environ and _cpu_vendor() in ("AuthenticAMD", "GenuineIntel"):
        assert k["tuning"] == ("amd" if _cpu_vendor() == "AuthenticAMD" else "intel")
    flags = set((_cpuinfo("flags") or "").split())
    if not os.environ.get("TORCHPOOL_CPU_ISA") and {"avx2", "fma"} <= flags:
        avx512 = k["tuning"] == "intel" and "avx512f" in flags
        assert k["isa"] == ("avx2+avx512" if avx512 else "avx2")


# (TORCHPOOL_CPU_TUNE, TORCHPOOL_CPU_ISA): Intel's tuning with its AVX-512 argmax where the CPU
# has AVX-512F, and without it (its two passes); AMD's (one pass in AVX2)
TUNINGS = [("intel", ""), ("intel", "avx2"), ("amd", "")]


@pytest.mark.parametrize("tune,isa", TUNINGS, ids=["intel", "intel-avx2", "amd"])
def test_cpu_tunings(device, tune, isa):
    """Each vendor tuning of the CPU kernels (TORCHPOOL_CPU_TUNE=intel or amd: the float
    reductions' prefetch, the short planes' argmax in one pass or two, in AVX-512 or AVX2) passes
    this file's tests of short and long planes and of parity with torch, whichever CPU runs
    them."""
    if device != "cpu":
        pytest.skip("the tunings are the CPU kernels'")
    env = dict(TORCHPOOL_CPU_TUNE=tune, TORCHPOOL_CPU_ISA=isa)
    named = python_with("import torchpool; print(torchpool.cpu_kernels()['tuning'])", **env)
    assert named.stdout.strip() == tune, named.stderr[-2000:]
    assert_tests_pass_with(Path(__file__).name,
                           "short_planes or long_planes or lane_distances or global_matches_torch",
                           **env)


def test_cpu_tuning_bad_value(device):
    """An unknown TORCHPOOL_CPU_TUNE fails every op call with one error that names the variable,
    the value and the rule, rather than running some tuning silently."""
    if device != "cpu":
        pytest.skip("the tunings are the CPU kernels'")
    _assert_every_call_fails("TORCHPOOL_CPU_TUNE=zen4: must be intel or amd",
                             TORCHPOOL_CPU_TUNE="zen4")


def test_cpu_isa_choices(device):
    """TORCHPOOL_CPU_ISA=base picks the portable kernels; =avx2 the AVX2 ones where the CPU has
    AVX2 and FMA, else every op call fails with one error saying so."""
    if device != "cpu":
        pytest.skip("the instruction sets are the CPU kernels'")
    code = "import torchpool; print(torchpool.cpu_kernels()['isa'])"
    base = python_with(code, TORCHPOOL_CPU_ISA="base")
    assert base.stdout.strip() == "base", base.stderr[-2000:]
    flags = _cpuinfo("flags")
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to tell whether the CPU has AVX2")
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= set(flags.split()):
        forced = python_with(code, TORCHPOOL_CPU_ISA="avx2")
        assert forced.stdout.strip() == "avx2", forced.stderr[-2000:]  # without the AVX-512 parts
    else:
        _assert_every_call_fails("TORCHPOOL_CPU_ISA=avx2: this CPU (or this build) has no AVX2",
                                 TORCHPOOL_CPU_ISA="avx2")


def test_cpu_isa_bad_value(device):
    """An unknown TORCHPOOL_CPU_ISA fails every op call with one error that names the variable,
    the value and the rule, rather than being ignored."""
    if device != "cpu":
        pytest.skip("the instruction sets are the CPU kernels'")
    _assert_every_call_fails("TORCHPOOL_CPU_ISA=avx512: must be base or avx2",
                             TORCHPOOL_CPU_ISA="avx512")
