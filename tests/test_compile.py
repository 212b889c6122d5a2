"""torch.library.opcheck on samples of every torchpool op, and torch.compile(fullgraph=True) of
models using torchpool, checked against the same models built from torch.nn."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torchpool.functional as tpf
import torchpool.nn as tpnn
from conftest import (
    HYPOTHESIS,
    TorchAvgPool2d,
    assert_close,
    channels_last_format,
    make_input,
    pool_cases,
)

ops = torch.ops.torchpool

# (shape, layout, kernel, stride, pad_before, pad_after, dilation, ceil_mode)
GEOMETRIES = {
    "1d": ((2, 3, 11), "contiguous", [3], [2], [1], [1], [1], False),
    "1d-ceil-dilated": ((2, 3, 12), "contiguous", [3], [2], [1], [0], [2], True),
    "2d-asym": ((2, 3, 9, 10), "contiguous", [3, 2], [2, 1], [1, 0], [1, 1], [1, 2], True),
    "2d-channels_last": ((2, 4, 9, 10), "channels_last", [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], False),
    # One output cell: the output is contiguous too, so the backward ops are told the layout.
    "2d-channels_last-one-cell": ((2, 4, 3, 3), "channels_last", [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False),
    "2d-wide-window": ((1, 2, 20, 19), "contiguous", [17, 17], [1, 1], [0, 0], [0, 0], [1, 1], False),
    "2d-empty-batch": ((0, 3, 8, 8), "contiguous", [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False),
    "3d": ((2, 3, 5, 6, 7), "contiguous", [2, 2, 3], [2, 1, 2], [0, 1, 1], [1, 1, 1], [1, 1, 1], True),
    "3d-channels_last": ((2, 3, 4, 6, 5), "channels_last", [2, 2, 2], [2, 2, 2], [0, 0, 0], [0, 0, 0], [1, 1, 1], False),
}
MAX_OPS = ["max_pool", "max_pool_with_pos", "max_pool_backward", "max_pool_indices"]
AVG_OPS = ["avg_pool", "avg_pool_backward"]
GLOBAL_OPS = [
    "global_max_pool",
    "global_max_pool_with_pos",
    "global_max_pool_backward",
    "global_avg_pool",
    "global_avg_pool_backward",
]


def _input(shape, layout, device, dtype=torch.float32):
    n = 1
    for s in shape:
        n *= s
    x = (torch.randperm(max(n, 1), generator=torch.Generator().manual_seed(0))[:n].to(dtype) - n // 2).reshape(shape)
    x = x.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=channels_last_format(len(shape)))
    return x


def _grad_like(t):
    """A nonzero upstream gradient with the strides of `t` (as autograd would pass it)."""
    g = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) + 0.25
    return torch.empty_like(t).copy_(g)


def sample(op_name, geometry, device, dtype=torch.float32):
    shape, layout, k, s, pb, pa, d, ceil = GEOMETRIES[geometry]
    x = _input(shape, layout, device, dtype)
    size = list(shape)
    # The backward ops' channels_last: given for the channels_last samples, left to its default
    # (grad_output's layout) for the others.
    told = (True,) if layout == "channels_last" else ()
    if op_name == "max_pool":
        return (x, k, s, pb, pa, d, ceil)
    out, pos = ops.max_pool_with_pos(x, k, s, pb, pa, d, ceil)
    if op_name == "max_pool_with_pos":
        return (x, k, s, pb, pa, d, ceil)
    if op_name == "max_pool_backward":
        return (_grad_like(out), pos, size, k, s, pb, pa, d, ceil, *told)
    if op_name == "max_pool_indices":
        return (pos, size, k, s, pb, pa, d, ceil)
    if op_name == "avg_pool":
        return (x, k, s, pb, pa, ceil, False, None)
    if op_name == "avg_pool_backward":
        out = ops.avg_pool(x, k, s, pb, pa, ceil, True, 5)
        return (_grad_like(out), size, k, s, pb, pa, ceil, True, 5, *told)
    raise ValueError(op_name)


def global_sample(op_name, geometry, device, dtype=torch.float32):
    shape, layout = GEOMETRIES[geometry][:2]
    x = _input(shape, layout, device, dtype)
    size = list(shape)
    cl = layout == "channels_last"
    if op_name in ("global_max_pool", "global_max_pool_with_pos", "global_avg_pool"):
        return (x,)
    gout = (torch.randn(shape[:2], generator=torch.Generator().manual_seed(2)) + 0.25).to(device, dtype)
    if op_name == "global_max_pool_backward":
        _, pos = ops.global_max_pool_with_pos(x)
        return (gout, pos, size, cl)
    return (gout, size, cl)


AVG_GEOMETRIES = [g for g, geo in GEOMETRIES.items() if all(d == 1 for d in geo[6])]  # avg has no dilation


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("op_name", MAX_OPS)
def test_opcheck_max_ops(device, op_name, geometry):
    torch.library.opcheck(getattr(ops, op_name).default, sample(op_name, geometry, device))


@pytest.mark.parametrize("geometry", AVG_GEOMETRIES)
@pytest.mark.parametrize("op_name", AVG_OPS)
def test_opcheck_avg_ops(device, op_name, geometry):
    torch.library.opcheck(getattr(ops, op_name).default, sample(op_name, geometry, device))


@pytest.mark.parametrize("geometry", ["1d", "2d-asym", "2d-channels_last", "2d-empty-batch", "3d", "3d-channels_last"])
@pytest.mark.parametrize("op_name", GLOBAL_OPS)
def test_opcheck_global_ops(device, op_name, geometry):
    torch.library.opcheck(getattr(ops, op_name).default, global_sample(op_name, geometry, device))


@pytest.mark.parametrize("geometry", ["1d-ceil-dilated", "2d-asym", "2d-channels_last", "2d-channels_last-one-cell",
                                      "3d", "3d-channels_last"])
@pytest.mark.parametrize("op_name", ["max_pool", "max_pool_with_pos", "max_pool_backward", "avg_pool",
                                     "avg_pool_backward"])
def test_window_ops_carry_their_autograd(device, op_name, geometry):
    """The window ops and their backward ops are differentiable as they are (autograd registered
    in C++): opcheck with a first argument that requires grad (autograd registration, AOT
    autograd), gradcheck and gradgradcheck of the op called directly in float64, and no graph
    where no gradient is wanted."""
    if op_name.startswith("avg") and geometry not in AVG_GEOMETRIES:
        pytest.skip("average pooling has no dilation")
    first, *rest = sample(op_name, geometry, device, torch.float64)
    first = first.detach().requires_grad_()
    op = getattr(ops, op_name).default
    torch.library.opcheck(op, (first, *rest))

    def fn(t):  # the positions of max_pool_with_pos are not differentiable
        out = op(t, *rest)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(fn, (first,))
    assert torch.autograd.gradgradcheck(fn, (first,))
    assert fn(first).grad_fn is not None and fn(first.detach()).grad_fn is None
    with torch.no_grad():
        assert fn(first).grad_fn is None


@pytest.mark.parametrize("geometry", ["1d", "2d-asym", "2d-channels_last", "3d-channels_last"])
@pytest.mark.parametrize("op_name", ["global_max_pool", "global_max_pool_with_pos", "global_max_pool_backward",
                                     "global_avg_pool", "global_avg_pool_backward"])
def test_opcheck_global_ops_with_grad(device, op_name, geometry):
    """The global ops' autograd (registered in C++) seen by opcheck: registered for autograd, and
    traced with its backward by AOT autograd."""
    args = global_sample(op_name, geometry, device, torch.float64)
    args = (args[0].requires_grad_(),) + args[1:]
    torch.library.opcheck(getattr(ops, op_name).default, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op_name", ["max_pool_with_pos", "max_pool_backward", "avg_pool", "avg_pool_backward"])
def test_opcheck_dtypes(device, op_name, dtype):
    torch.library.opcheck(getattr(ops, op_name).default, sample(op_name, "2d-asym" if "max" in op_name else "3d", device, dtype))
    gname = "global_max_pool_backward" if "max" in op_name else "global_avg_pool"
    torch.library.opcheck(getattr(ops, gname).default, global_sample(gname, "2d-channels_last", device, dtype))


# --- torch.compile -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _models(seed=0):
    """The same network twice: pooling from torchpool, and from torch.nn (same weights)."""
    torch.manual_seed(seed)
    ours = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        tpnn.MaxPool2d(2),
        nn.ReLU(),
        tpnn.AvgPool2d(3, stride=1, padding="same"),
        tpnn.MaxPool2d(3, stride=2, padding=1),
        tpnn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
        tpnn.GlobalMaxPool2d(),
        nn.Linear(8, 4),
    )
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        TorchAvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.MaxPool2d(3, stride=2, padding=1),
        TorchAvgPool2d(2, ceil_mode=True, count_include_pad=False),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    ref[0].load_state_dict(ours[0].state_dict())
    ref[8].load_state_dict(ours[7].state_dict())
    return ours, ref


def _check_model(compiled, ref, x, rtol=1e-5, atol=1e-6):
    xo = x.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    out = compiled(xo)
    rout = ref(xr)
    assert_close(out, rout)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    out.backward(g)
    rout.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=rtol, atol=atol)
    assert bool((xr.grad != 0).any())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph_model_aot_eager(device, layout):
    ours, ref = _models()
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randn(2, 3, 20, 22, generator=torch.Generator().manual_seed(4)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    _check_model(compiled, ref, x)
    conv = ours[0].weight.grad
    ref_conv = ref[0].weight.grad
    torch.testing.assert_close(conv, ref_conv, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_functional_all_ops(device):
    """Every functional entry point, 1d/2d/3d, traced without graph breaks, equals torch."""

    def ours(x1, x2, x3):
        a, idx = tpf.max_pool1d(x1, 3, 2, 1, return_indices=True)
        b = tpf.avg_pool1d(x1, 4, 2, 2, ceil_mode=True, divisor_override=3)
        c = tpf.max_pool2d(x2, (3, 2), 1, padding="same")
        d = tpf.avg_pool2d(x2, 3, 2, 1, count_include_pad=False)
        e = tpf.max_pool3d(x3, 2, dilation=(1, 2, 1))
        f = tpf.avg_pool3d(x3, 3, 2, 1)
        g = tpf.global_avg_pool3d(x3, keepdim=True)
        h = tpf.global_max_pool1d(x1)
        return a, idx, b, c, d, e, f, g, h

    def ref(x1, x2, x3):
        a, idx = F.max_pool1d(x1, 3, 2, 1, return_indices=True)
        b = F.avg_pool2d(x1.unsqueeze(2), (1, 4), (1, 2), (0, 2), ceil_mode=True, divisor_override=3).squeeze(2)
        c = F.max_pool2d(F.pad(x2, (0, 1, 1, 1), value=float("-inf")), (3, 2), 1)
        d = F.avg_pool2d(x2, 3, 2, 1, count_include_pad=False)
        e = F.max_pool3d(x3, 2, dilation=(1, 2, 1))
        f = F.avg_pool3d(x3, 3, 2, 1)
        g = x3.mean(dim=(2, 3, 4), keepdim=True)
        h = x1.amax(dim=2)
        return a, idx, b, c, d, e, f, g, h

    gen = torch.Generator().manual_seed(5)
    xs = [torch.randperm(n, generator=gen).float().reshape(shape).to(device) - n // 2
          for n, shape in ((2 * 3 * 15, (2, 3, 15)), (2 * 3 * 8 * 9, (2, 3, 8, 9)), (2 * 2 * 6 * 7 * 6, (2, 2, 6, 7, 6)))]
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    xg = [x.clone().requires_grad_() for x in xs]
    outs = compiled(*xg)
    for o, r in zip(outs, ref(*xs)):
        if r.dtype == torch.int64:
            assert torch.equal(o, r)
        else:
            assert_close(o, r)
    sum(o.sum() for o in outs if o.is_floating_point()).backward()
    xr = [x.clone().requires_grad_() for x in xs]
    sum(o.sum() for o in ref(*xr) if o.is_floating_point()).backward()
    for a, b in zip(xg, xr):
        assert_close(a.grad, b.grad)


def test_compile_dynamic_shapes(device):
    ours, ref = _models()
    ours, ref = ours.to(device), ref.to(device)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in ((2, 3, 20, 22), (3, 3, 17, 25), (1, 3, 31, 16)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(device)
        _check_model(compiled, ref, x)


@pytest.mark.slow
def test_compile_fullgraph_inductor(device):
    ours, ref = _models()
    ours, ref = ours.to(device), ref.to(device)
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(6)).to(device)
    _check_model(compiled, ref, x, rtol=1e-4, atol=1e-5)


# --- fake kernels agree with the real ones ----------------------------------------------------------


def _meta(t):
    return tuple(t.shape), t.stride(), t.dtype


@HYPOTHESIS
@given(case=st.one_of(pool_cases("max"), pool_cases("avg")))
def test_fake_matches_real_hypothesis(device, case):
    """Shapes, strides and dtypes from the fake kernels (what torch.compile traces) equal the real
    outputs', forward and backward, for random configurations and layouts."""
    x = make_input(case["shape"], case["dtype"], device, case["layout"], torch.Generator().manual_seed(case["seed"]))
    nd, kw = case["nd"], dict(case["kw"])
    fn = getattr(tpf, ("max" if "dilation" in kw else "avg") + f"_pool{nd}d")
    if "dilation" in kw:
        kw["return_indices"] = True

    def run(t):
        out = fn(t, **kw)
        main = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad(main, t, torch.ones_like(main))
        gmax = getattr(tpf, f"global_max_pool{nd}d")(t, keepdim=True)
        gavg = getattr(tpf, f"global_avg_pool{nd}d")(t)
        return list(out if isinstance(out, tuple) else (out,)) + [grad, gmax, gavg]

    real = run(x.detach().requires_grad_())
    with FakeTensorMode() as mode:
        fake = run(mode.from_tensor(x).requires_grad_())
    for r, f in zip(real, fake):
        assert _meta(r) == _meta(f)
