"""The validated-geometry cache of torchpool._args: a cached geometry is the one worked out afresh
(and pools as torch does), arguments that only compare equal to a cached key (True == 1,
2.0 == 2) still raise their errors, failures are never cached, and the cache stays bounded."""
import random

import pytest
import torch
import torch.nn.functional as F

import torchpool.functional as tpf
from torchpool import _args

POOLS = [("max_pool1d", 1), ("max_pool2d", 2), ("max_pool3d", 3),
         ("avg_pool1d", 1), ("avg_pool2d", 2), ("avg_pool3d", 3)]


def test_cached_geometry_is_the_fresh_one():
    rng = random.Random(0)
    for _ in range(300):
        nd = rng.randint(1, 3)
        shape = (2, 3) + tuple(rng.randint(3, 12) for _ in range(nd))
        k = tuple(rng.randint(1, 3) for _ in range(nd))
        args = dict(kernel_size=k if rng.random() < 0.5 else list(k),
                    stride=rng.choice([None, rng.randint(1, 3)]),
                    padding=rng.choice([0, 1, "same", "valid"]) if min(k) >= 2 else 0,
                    dilation=1, ceil_mode=rng.random() < 0.5)
        fresh = _args._geometry(f"max_pool{nd}d", shape, shape[2:], nd, *args.values())
        x = torch.randn(shape)
        for _ in range(2):  # a miss, then a hit
            assert _args.geometry(f"max_pool{nd}d", shape, nd, *args.values()) == fresh
            if not isinstance(args["padding"], str):  # torch has no 'same' / 'valid' here
                got = getattr(tpf, f"max_pool{nd}d")(x, **args)
                torch.testing.assert_close(got, getattr(F, f"max_pool{nd}d")(x, **args), rtol=0, atol=0)


@pytest.mark.parametrize("name,nd", POOLS)
def test_equal_but_invalid_arguments_still_raise(name, nd):
    x = torch.randn((2, 3) + (8,) * nd)
    f = getattr(tpf, name)
    f(x, 2, 2, 1)  # caches kernel_size 2, stride 2, padding 1
    with pytest.raises(TypeError, match=rf"{name}: kernel_size must be an int .*got True"):
        f(x, True)
    with pytest.raises(TypeError, match=rf"{name}: kernel_size must be an int .*got 2\.0"):
        f(x, 2.0, 2, 1)
    with pytest.raises(TypeError, match=rf"{name}: stride must be an int .*got True"):
        f(x, 2, True, 1)
    with pytest.raises(TypeError, match=rf"{name}: padding must be an int .*got True"):
        f(x, 2, 2, True)
    with pytest.raises(ValueError, match=rf"{name}: kernel_size must be an int .*got \(2\.0,"):
        f(x, (2.0,) + (2,) * (nd - 1), 2, 1)


@pytest.mark.parametrize("name,nd", POOLS)
def test_failures_are_not_cached(name, nd):
    f = getattr(tpf, name)
    small = torch.randn((2, 3) + (2,) * nd)
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"{name}: input of shape .* is too small"):
            f(small, 3)
        with pytest.raises(ValueError, match=rf"{name}: kernel_size must be positive"):
            f(small, 0)
    # The same arguments on a large enough input: valid, and torch's result.
    x = torch.randn((2, 3) + (6,) * nd)
    torch.testing.assert_close(f(x, 3), getattr(F, name)(x, 3), rtol=0, atol=0)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_args, "_GEOMETRIES", {})
    monkeypatch.setattr(_args, "_GEOMETRIES_CAP", 8)
    for w in range(4, 40):
        x = torch.randn(1, 2, w)
        torch.testing.assert_close(tpf.max_pool1d(x, 3, 2), F.max_pool1d(x, 3, 2), rtol=0, atol=0)
        assert len(_args._GEOMETRIES) <= 8


def _general_path_refused(*args):
    raise AssertionError("the general path was taken")


def _known_calls(f):
    (known,) = [c.cell_contents for c in f.__closure__ if isinstance(c.cell_contents, dict)]
    return known


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("name,nd", POOLS)
def test_repeated_calls_take_the_short_path(monkeypatch, name, nd, train, layout):
    """A call made before (same shape, dtype, arguments and argument types) goes straight to the
    op, whose autograd node is built in C++; its results and gradients are torch's. Any other call takes the
    general path: unbatched, return_indices, tuple arguments, a tensor subclass, another shape."""
    f, ref = getattr(tpf, name), getattr(F, name)
    args = (3, 2, 1) if nd < 3 else (2, 1)
    if layout == "channels_last" and nd == 1:
        pytest.skip("no channels_last for 1d")
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd, torch.contiguous_format)
    x = torch.randn((2, 16) + (7,) * nd).contiguous(
        memory_format=fmt if layout == "channels_last" else torch.contiguous_format)
    x.requires_grad_(train)
    f(x, *args)  # the general path; the call is stored
    assert len(_known_calls(f)) >= 1
    kind = "_max_pool" if name.startswith("max") else "_avg_pool"
    monkeypatch.setattr(tpf, kind, _general_path_refused)
    got, want = f(x, *args), ref(x, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.requires_grad == train
    if train:
        assert got.grad_fn.name().startswith("torch::autograd::CppNode<torchpool::")
        g = torch.randn(want.shape)
        (gx,) = torch.autograd.grad(got, x, g)
        (want_gx,) = torch.autograd.grad(want, x, g)
        torch.testing.assert_close(gx, want_gx, rtol=1e-6, atol=1e-6)
        assert gx.stride() == x.stride()
    others = [lambda: f(x[0], *args), lambda: f(x, (args[0],) * nd, *args[1:]),
              lambda: f(torch.nn.Parameter(x.detach()), *args), lambda: f(x[:, :3], *args),
              lambda: f(x.double(), *args), lambda: f(x, *args[:-1], 0)]
    if kind == "_max_pool":
        others.append(lambda: f(x, *args, return_indices=True))
    for call in others:
        with pytest.raises(AssertionError, match="general path"):
            call()


def test_known_calls_are_bounded(monkeypatch):
    monkeypatch.setattr(tpf, "_KNOWN_CAP", 8)
    _known_calls(tpf.max_pool1d).clear()
    for w in range(4, 40):
        x = torch.randn(1, 2, w)
        for _ in range(2):
            torch.testing.assert_close(tpf.max_pool1d(x, 3, 2), F.max_pool1d(x, 3, 2), rtol=0, atol=0)
        assert 1 <= len(_known_calls(tpf.max_pool1d)) <= 8
