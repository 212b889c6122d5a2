"""torchpool.nn modules: drop-in parity with torch.nn (forward, backward, return_indices, repr),
string paddings, global pool modules, and the seed MNIST model end to end."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchpool.nn as tpnn
from conftest import assert_close, make_input, run_fwd_bwd

SHAPES = {1: (2, 3, 17), 2: (2, 3, 11, 13), 3: (2, 3, 7, 8, 9)}

MODULES = [
    ("MaxPool1d", 1, (3, 2, 1), dict(dilation=2, ceil_mode=True)),
    ("MaxPool1d", 1, (4,), dict(return_indices=True)),
    ("MaxPool2d", 2, ((3, 2), 1, (1, 0), 2, True, True), {}),
    ("MaxPool2d", 2, (2,), {}),
    ("MaxPool3d", 3, (2,), {}),
    ("MaxPool3d", 3, (3, 2, 1), dict(return_indices=True)),
    ("AvgPool1d", 1, (3, 2, 1, True, False), {}),
    ("AvgPool1d", 1, (2,), {}),
    ("AvgPool2d", 2, ((3, 2), None, (1, 0), True, False, 4), {}),
    ("AvgPool2d", 2, (2,), {}),
    ("AvgPool3d", 3, (3, 2, 1), dict(divisor_override=2)),
    ("AvgPool3d", 3, (2,), dict(ceil_mode=True, count_include_pad=False)),
]


@pytest.mark.parametrize("name,nd,args,kwargs", MODULES)
def test_module_matches_torch_nn(device, rng, name, nd, args, kwargs):
    ours = getattr(tpnn, name)(*args, **kwargs)
    ref = getattr(nn, name)(*args, **kwargs)
    assert isinstance(ours, nn.Module)
    assert repr(ours) == repr(ref)
    assert list(ours.parameters()) == [] and list(ours.buffers()) == []
    is_max = name.startswith("Max")
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng, kind="distinct" if is_max else "randn")
    out, grad, g = run_fwd_bwd(ours, x, gen=rng)
    rout, rgrad, _ = run_fwd_bwd(ref, x, g=g)
    if kwargs.get("return_indices") or (len(args) == 6 and args[5] is True):
        assert isinstance(out, tuple) and len(out) == 2
        assert torch.equal(out[1], rout[1])
        out, rout = out[0], rout[0]
    assert_close(out, rout, exact=is_max)
    assert_close(grad, rgrad)
    with torch.no_grad():
        again = ours(x)
    assert_close(again[0] if isinstance(again, tuple) else again, rout, exact=is_max)


@pytest.mark.parametrize(
    "module,reference",
    [
        # 'same' for size 11 x 13, kernel 3, stride 2: total padding 2 per dim -> (1, 1) each.
        (lambda: tpnn.MaxPool2d(3, 2, padding="same"), lambda x: F.max_pool2d(x, 3, 2, padding=1)),
        # 'same' for length 17, kernel 4, stride 3: 17 % 3 = 2 -> total 2 -> (1, 1).
        (lambda: tpnn.AvgPool1d(4, 3, padding="same"),
         lambda x: F.avg_pool1d(F.pad(x, (1, 1)), 4, 3) / F.avg_pool1d(F.pad(torch.ones_like(x), (1, 1)), 4, 3)),
        # 'same' for 7 x 8 x 9, kernel 2, stride 2: totals (1, 0, 1) -> padding after only.
        (lambda: tpnn.MaxPool3d(2, padding="same"),
         lambda x: F.max_pool3d(F.pad(x, (0, 1, 0, 0, 0, 1), value=float("-inf")), 2)),
        (lambda: tpnn.AvgPool3d(2, padding="valid"), lambda x: F.avg_pool3d(x, 2)),
        (lambda: tpnn.MaxPool1d(3, 1, padding="valid"), lambda x: F.max_pool1d(x, 3, 1)),
    ],
)
def test_module_string_padding(device, rng, module, reference):
    m = module()
    assert m.padding in ("same", "valid")
    nd = int(type(m).__name__[-2])
    is_max = type(m).__name__.startswith("Max")
    x = make_input(SHAPES[nd], torch.float64, device, "contiguous", rng, kind="distinct" if is_max else "randn")
    out, grad, g = run_fwd_bwd(m, x, gen=rng)
    rout, rgrad, _ = run_fwd_bwd(reference, x, g=g)
    assert_close(out, rout, exact=is_max)
    assert_close(grad, rgrad)
    assert "same" in repr(m) or "valid" in repr(m)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("keepdim", [False, True])
def test_global_modules(device, rng, nd, keepdim):
    x = make_input(SHAPES[nd], torch.float32, device, "contiguous", rng, kind="distinct")
    dims = tuple(range(2, 2 + nd))
    for name, ref in (("GlobalMaxPool", lambda t: t.amax(dims, keepdim=keepdim)),
                      ("GlobalAvgPool", lambda t: t.mean(dims, keepdim=keepdim))):
        m = getattr(tpnn, f"{name}{nd}d")(keepdim=keepdim)
        assert isinstance(m, nn.Module) and list(m.parameters()) == []
        assert f"keepdim={keepdim}" in repr(m)
        out, grad, g = run_fwd_bwd(m, x, gen=rng)
        rout, rgrad, _ = run_fwd_bwd(ref, x, g=g)
        assert_close(out, rout, exact=name == "GlobalMaxPool")
        assert_close(grad, rgrad)
    assert getattr(tpnn, f"GlobalAvgPool{nd}d")()(x).shape == (2, 3)


def mnist_model(pool):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        pool.MaxPool2d(2),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        pool.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mnist_seed_model(device, layout):
    torch.manual_seed(0)
    ours = mnist_model(tpnn).to(device)
    ref = mnist_model(nn).to(device)
    ref.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, ref = ours.to(memory_format=fmt), ref.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(16, 1, 28, 28, generator=gen).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (16,), generator=gen).to(device)
        logits, rlogits = ours(x), ref(x)
        assert logits.shape == (16, 10)
        torch.testing.assert_close(logits, rlogits, rtol=1e-5, atol=1e-5)
        for model, out, opt in ((ours, logits, opt_ours), (ref, rlogits, opt_ref)):
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
        for (name, p), rp in zip(ours.named_parameters(), ref.parameters()):
            assert bool((rp.grad != 0).any()), name
            torch.testing.assert_close(p.grad, rp.grad, rtol=1e-4, atol=1e-6, msg=name)
        opt_ours.step()
        opt_ref.step()


@pytest.mark.parametrize(
    "name,args,ref",
    [
        pytest.param("MaxPool2d", (3, 2, 1), lambda: nn.MaxPool2d(3, 2, 1), id="MaxPool2d"),
        pytest.param("AvgPool2d", (3, 2, 1), lambda: nn.AvgPool2d(3, 2, 1), id="AvgPool2d"),
        pytest.param("GlobalMaxPool2d", (), lambda: nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()),
                     id="GlobalMaxPool2d"),
        pytest.param("GlobalAvgPool2d", (), lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                     id="GlobalAvgPool2d"),
    ],
)
def test_double_backward_correct_or_refused(device, rng, name, args, ref):
    """A gradient penalty differentiates the pool's backward with respect to its grad_output.
    That must either match torch or raise a clear error — never silently drop the term."""

    def penalty_grad(pool):
        x = make_input((2, 3, 8, 8), torch.float64, device, "contiguous", torch.Generator().manual_seed(0),
                       kind="distinct").requires_grad_()
        out = pool(x)
        s = (torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5).to(
            device).requires_grad_()
        gx, = torch.autograd.grad((out * s).sum(), x, create_graph=True)
        penalty = (gx ** 2).sum() + (s ** 2).sum()
        return torch.autograd.grad(penalty, s)[0]

    expected = penalty_grad(ref())
    try:
        got = penalty_grad(getattr(tpnn, name)(*args))
    except RuntimeError as e:
        assert re.search(r"twice|double backward|second|higher order|once_differentiable", str(e)), str(e)
        return
    assert_close(got, expected)


@pytest.mark.parametrize(
    "ours,ref",
    [
        pytest.param(tpnn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), id="MaxPool2d"),
        pytest.param(tpnn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                     id="AvgPool2d"),
        pytest.param(tpnn.GlobalMaxPool2d(), nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()),
                     id="GlobalMaxPool2d"),
        pytest.param(tpnn.GlobalAvgPool2d(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                     id="GlobalAvgPool2d"),
    ],
)
def test_torch_func_grad(device, rng, ours, ref):
    """Under functorch transforms (torch.func.grad) the pools take torch's full autograd.Function
    path; plain autograd takes the direct one. Both give torch's gradient."""
    x = make_input((2, 3, 9, 10), torch.float32, device, "contiguous", rng, kind="distinct")
    w = torch.randn((2, 3, 5, 5) if isinstance(ours, tpnn.MaxPool2d) else
                    (2, 3, 9, 10) if isinstance(ours, tpnn.AvgPool2d) else (2, 3), generator=rng).to(device)
    expected = torch.func.grad(lambda t: (ref(t) * w).sum())(x)
    assert_close(torch.func.grad(lambda t: (ours(t) * w).sum())(x), expected)
    xg = x.clone().requires_grad_()
    (ours(xg) * w).sum().backward()
    assert_close(xg.grad, expected)
