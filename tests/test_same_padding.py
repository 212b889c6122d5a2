"""String paddings: 'same' (TensorFlow/Keras rule) against an explicit-padding torch reference and a
float64 loop reference; 'valid' against padding=0; the Keras documentation examples."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import torchpool.functional as tpf
from conftest import (
    DTYPES,
    HYPOTHESIS,
    assert_close,
    assert_layout_follows,
    layouts_for,
    make_input,
    ref_dtype,
    run_fwd_bwd,
)

OURS = {
    "max": {1: tpf.max_pool1d, 2: tpf.max_pool2d, 3: tpf.max_pool3d},
    "avg": {1: tpf.avg_pool1d, 2: tpf.avg_pool2d, 3: tpf.avg_pool3d},
}
TORCH = {
    "max": {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d},
    "avg": {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d},
}


def _tuple(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


def same_pads(size, k, s):
    """TensorFlow's rule: pad so that the output has ceil(size / stride) cells; extra cell after."""
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


def reference_same(x, kind, nd, kernel_size, stride):
    """Explicit padding with torch: -inf padding for max; for avg, the window sum over zero padding
    divided by the number of real cells (padding excluded)."""
    ks = _tuple(kernel_size, nd)
    ss = ks if stride is None else _tuple(stride, nd)
    pads = [same_pads(x.shape[x.dim() - nd + i], ks[i], ss[i]) for i in range(nd)]
    fpad = [p for before_after in reversed(pads) for p in before_after]
    pool = TORCH[kind][nd]
    if kind == "max":
        return pool(F.pad(x, fpad, value=float("-inf")), ks, ss)
    summed = pool(F.pad(x, fpad), ks, ss)
    count = pool(F.pad(torch.ones_like(x), fpad), ks, ss)
    return summed / count


def loop_reference_same(x, kind, kernel, stride):
    """Plain-Python float64 reference for one (C, *spatial) or (N, C, *spatial) tensor."""
    nd = len(kernel)
    xs = x.detach().double().cpu()
    sizes = xs.shape[-nd:]
    pads = [same_pads(sizes[i], kernel[i], stride[i]) for i in range(nd)]
    outs = [math.ceil(sizes[i] / stride[i]) for i in range(nd)]
    lead = xs.shape[:-nd]
    res = torch.empty(*lead, *outs, dtype=torch.float64)
    for lidx in itertools.product(*[range(n) for n in lead]):
        for o in itertools.product(*[range(n) for n in outs]):
            vals = []
            for kk in itertools.product(*[range(k) for k in kernel]):
                pos = [o[i] * stride[i] - pads[i][0] + kk[i] for i in range(nd)]
                if all(0 <= pos[i] < sizes[i] for i in range(nd)):
                    vals.append(float(xs[lidx + tuple(pos)]))
            res[lidx + o] = max(vals) if kind == "max" else sum(vals) / len(vals)
    return res


def check_same(x, kind, nd, kernel_size, stride, gen):
    dtype, rd = x.dtype, ref_dtype(x.dtype)
    ours = OURS[kind][nd]
    kw = dict(kernel_size=kernel_size, stride=stride, padding="same")
    with torch.no_grad():
        out_inf = ours(x, **kw)
    out, grad, g = run_fwd_bwd(lambda t: ours(t, **kw), x, gen=gen)
    rout, rgrad, _ = run_fwd_bwd(lambda t: reference_same(t, kind, nd, kernel_size, stride), x.to(rd), g=g.to(rd))
    ss = _tuple(kernel_size if stride is None else stride, nd)
    expected_shape = x.shape[: x.dim() - nd] + tuple(math.ceil(x.shape[x.dim() - nd + i] / ss[i]) for i in range(nd))
    assert tuple(rout.shape) == expected_shape  # the reference itself follows the rule
    exact = kind == "max"
    assert_close(out_inf, rout.to(dtype), dtype, exact=exact)
    assert_close(out, rout.to(dtype), dtype, exact=exact)
    assert_close(grad, rgrad.to(dtype), dtype)
    assert_layout_follows(x, out_inf, out, grad)
    if kind == "max":
        out2, idx = ours(x, return_indices=True, **kw)
        assert_close(out2, rout.to(dtype), exact=True)
        flat = x.reshape(*x.shape[: x.dim() - nd], -1)
        picked = flat.gather(-1, idx.reshape(*idx.shape[: idx.dim() - nd], -1))
        assert_close(picked, out2.reshape(picked.shape), exact=True)


SHAPES = {1: (2, 3, 13), 2: (2, 3, 10, 7), 3: (2, 2, 5, 6, 7)}
CASES = {
    1: [(2, None), (3, 1), (3, 2), (4, 3), (2, 5), (5, 2)],
    2: [(2, None), (3, 1), (3, 2), ((4, 2), (3, 1)), ((1, 3), (2, 4))],
    3: [(2, None), (3, 2), ((2, 3, 1), (1, 2, 3))],
}
GRID = [
    (kind, nd, i, dtype, layout)
    for kind in ("max", "avg")
    for nd in (1, 2, 3)
    for i in range(len(CASES[nd]))
    for dtype in DTYPES
    for layout in layouts_for(nd + 2)
]


@pytest.mark.parametrize("kind,nd,case,dtype,layout", GRID)
def test_same_matches_explicit_padding(device, rng, kind, nd, case, dtype, layout):
    x = make_input(SHAPES[nd], dtype, device, layout, rng, kind="distinct" if kind == "max" else "randn")
    k, s = CASES[nd][case]
    check_same(x, kind, nd, k, s, rng)


@st.composite
def same_cases(draw):
    nd = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 4) for _ in range(nd)])))
    sizes = tuple(draw(st.integers(1, {1: 15, 2: 9, 3: 6}[nd])) for _ in range(nd))
    batched = draw(st.booleans())
    shape = ((draw(st.integers(1, 2)), draw(st.integers(1, 3))) if batched else (draw(st.integers(1, 3)),)) + sizes
    return dict(
        kind=draw(st.sampled_from(["max", "avg"])),
        nd=nd,
        kernel=kernel,
        stride=stride,
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(layouts_for(len(shape)) if batched else layouts_for(0))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@HYPOTHESIS
@given(case=same_cases())
def test_same_hypothesis(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    kind = case["kind"]
    x = make_input(case["shape"], case["dtype"], device, case["layout"], gen, kind="distinct" if kind == "max" else "randn")
    check_same(x, kind, case["nd"], case["kernel"], case["stride"], gen)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
    "shape,kernel,stride",
    [((2, 9), (3,), (2,)), ((1, 8), (4,), (3,)), ((2, 5, 6), (3, 2), (2, 2)), ((1, 4, 7), (2, 4), (3, 1))],
)
def test_same_matches_loop_reference(device, rng, kind, shape, kernel, stride):
    x = make_input(shape, torch.float64, device, "contiguous", rng, kind="distinct" if kind == "max" else "randn")
    nd = len(kernel)
    out = OURS[kind][nd](x, kernel, stride, padding="same")
    assert_close(out.cpu(), loop_reference_same(x, kind, kernel, stride), exact=kind == "max")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_valid_is_no_padding(device, rng, kind, nd):
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng, kind="distinct")
    out = OURS[kind][nd](x, 3, 2, padding="valid")
    assert_close(out, TORCH[kind][nd](x, 3, 2, padding=0), exact=kind == "max")


def test_same_keeps_size_at_stride_one(device, rng):
    x = make_input((2, 3, 9, 8), torch.float32, device, "contiguous", rng)
    for k in (1, 2, 3, 4, 5):
        assert tpf.max_pool2d(x, k, 1, padding="same").shape == x.shape
        assert tpf.avg_pool2d(x, k, 1, padding="same").shape == x.shape


def test_keras_doc_examples(device):
    # keras.layers.MaxPooling1D / AveragePooling1D(pool_size=2, strides=1)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]], device=device)
    assert tpf.max_pool1d(x, 2, 1, padding="valid").tolist() == [[[2.0, 3.0, 4.0, 5.0]]]
    assert tpf.max_pool1d(x, 2, 1, padding="same").tolist() == [[[2.0, 3.0, 4.0, 5.0, 5.0]]]
    assert tpf.avg_pool1d(x, 2, 1, padding="valid").tolist() == [[[1.5, 2.5, 3.5, 4.5]]]
    assert tpf.avg_pool1d(x, 2, 1, padding="same").tolist() == [[[1.5, 2.5, 3.5, 4.5, 5.0]]]
    # keras.layers.MaxPooling2D / AveragePooling2D(pool_size=(2, 2), strides=(1, 1), padding="same")
    y = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]], device=device)
    assert tpf.max_pool2d(y, 2, 1, padding="same").tolist() == [[[[5.0, 6.0, 6.0], [8.0, 9.0, 9.0], [8.0, 9.0, 9.0]]]]
    assert tpf.avg_pool2d(y, 2, 1, padding="same").tolist() == [[[[3.0, 4.0, 4.5], [6.0, 7.0, 7.5], [7.5, 8.5, 9.0]]]]
    # all-negative values next to the padding: padding must not win the max
    assert tpf.max_pool2d(-y, 2, 1, padding="same").tolist() == [[[[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]]]]


def test_same_dilation_one_accepted(device, rng):
    x = make_input((1, 2, 7, 7), torch.float32, device, "contiguous", rng, kind="distinct")
    out = tpf.max_pool2d(x, 3, 2, padding="same", dilation=1)
    assert_close(out, reference_same(x, "max", 2, 3, 2), exact=True)
