"""Shared fixtures and helpers: devices, seeded RNG, input layouts, torch references, tolerances."""
import os
import subprocess
import sys
import zlib

import pytest
import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced")
# (spatial dims, layout) pairs: each dimensionality contiguous, and channels_last where it applies.
ND_LAYOUTS = [(1, "contiguous"), (2, "contiguous"), (2, "channels_last"), (3, "contiguous"), (3, "channels_last")]
# Batched inputs for the 1d/2d/3d window pools.
POOL_SHAPES = {1: (2, 3, 17), 2: (2, 3, 11, 13), 3: (2, 3, 7, 8, 9)}

# (rtol, atol) for values that went through a reduction (avg pools, summed gradients).
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return request.param


@pytest.fixture
def rng(request):
    """A CPU generator seeded from the test id, so each test (and parameter set) is reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def layouts_for(dim):
    """Layouts that apply to a tensor with `dim` dims (channels_last needs a 4d or 5d tensor)."""
    return LAYOUTS if dim in (4, 5) else tuple(lay for lay in LAYOUTS if lay != "channels_last")


def config_grid(configs):
    """(nd, config index, dtype, layout) for every config of configs[nd], every dtype and every
    layout that applies to a batched nd input."""
    return [
        (nd, i, dtype, layout)
        for nd in (1, 2, 3)
        for i in range(len(configs[nd]))
        for dtype in DTYPES
        for layout in layouts_for(nd + 2)
    ]


def channels_last_format(dim):
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def to_layout(x, layout):
    """The same values as `x`, stored in `layout`.

    contiguous; channels_last (channels_last_3d for 5d); permuted (dims stored in reverse order, so
    the tensor is dense but neither contiguous nor channels_last); sliced (every other element of a
    larger buffer along the last dim, so not dense).
    """
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=channels_last_format(x.dim()))
    if layout == "permuted":
        rev = tuple(reversed(range(x.dim())))
        return x.permute(rev).contiguous().permute(rev)
    if layout == "sliced":
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


def torch_avg_pool2d(x, *args, **kwargs):
    """F.avg_pool2d as a reference. On CUDA, an input torch would pool in its channels-last kernel
    is pooled as NCHW instead: that kernel's backward returns wrong gradients when padding > 0
    (pytorch/pytorch#188344, seen with torch 2.11 on an H200); its NCHW kernel is right."""
    if x.is_cuda and x.dim() == 4 and not x.is_contiguous():
        x = x.contiguous()
    return torch.nn.functional.avg_pool2d(x, *args, **kwargs)


class TorchAvgPool2d(torch.nn.AvgPool2d):
    """nn.AvgPool2d through torch_avg_pool2d."""

    def forward(self, x):
        return torch_avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad, self.divisor_override)


def make_input(shape, dtype=torch.float32, device="cpu", layout="contiguous", gen=None, kind="randn"):
    """A test input of `shape`.

    kind: 'randn' (normal), 'positive' (uniform in [0.5, 1.5), averages far from 0), 'distinct'
    (distinct nonzero integers around 0, so max pools have no ties and all-negative windows
    exist), 'ties' (small nonzero integers, many ties).
    """
    numel = 1
    for s in shape:
        numel *= s
    if kind == "randn":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "positive":
        x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    elif kind == "distinct":
        x = torch.randperm(numel, generator=gen, dtype=torch.float64) - numel // 2
        x = torch.where(x >= 0, x + 1, x).reshape(shape)
    elif kind == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
        x[x == 0] = 3.0
    else:
        raise ValueError(kind)
    return to_layout(x.to(dtype=dtype, device=device), layout)


def ref_dtype(dtype):
    """torch reference for half types runs in float32 on the upcast input."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def assert_close(actual, expected, dtype=None, exact=False, equal_nan=False):
    """Compare with the reference; refuses all-zero references (they would prove nothing)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    finite = expected[~torch.isnan(expected)] if equal_nan else expected
    assert finite.numel() == 0 or bool((finite != 0).any()), "reference is all zeros"
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=equal_nan)
    else:
        rtol, atol = TOLERANCES[dtype or expected.dtype]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan)


def assert_layout_follows(x, *tensors):
    """A strictly channels_last input (channels_last, not also contiguous) gives channels_last results."""
    if x.dim() in (4, 5):
        fmt = channels_last_format(x.dim())
        if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
            for t in tensors:
                assert t.is_contiguous(memory_format=fmt), (tuple(t.shape), t.stride())


def grad_output_like(out, gen):
    """Upstream gradient for `out`: random, nonzero, same dtype/device (contiguous)."""
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64) + 0.25
    return g.to(dtype=out.dtype, device=out.device)


def pool_outputs(fn, x, **kwargs):
    """fn(x, **kwargs), with the indices too where fn is a max pool."""
    return fn(x, return_indices=True, **kwargs) if "max" in fn.__name__ else fn(x, **kwargs)


def run_fwd_bwd(fn, x, g=None, gen=None):
    """Calls fn on a fresh leaf copy of x (same strides) and backprops g; returns (out(s), grad, g)."""
    leaf = x.detach().requires_grad_()
    out = fn(leaf)
    main = out[0] if isinstance(out, tuple) else out
    if g is None:
        g = grad_output_like(main, gen)
    main.backward(g)
    return out, leaf.grad, g


def run_fwd_grad(fn, x, gen):
    """As run_fwd_bwd, but the gradient as the backward returns it (torch.autograd.grad): a leaf's
    .grad is restrided to the leaf's layout by autograd, so it cannot show the backward's."""
    leaf = x.detach().requires_grad_()
    out = fn(leaf)
    g = grad_output_like(out, gen)
    (grad,) = torch.autograd.grad(out, leaf, g)
    return out, grad, g


def strided_grad_output(out, kind, gen):
    """A non-dense upstream gradient for `out`: 'transposed' (dims stored in reverse order, so not
    dense in the output's layout) or 'sliced' (every other element along the last dim)."""
    if kind == "transposed":
        rev = tuple(reversed(range(out.dim())))
        return torch.randn(tuple(reversed(out.shape)), generator=gen).to(out.device).permute(*rev)
    if kind == "sliced":
        return torch.randn(*out.shape[:-1], 2 * out.shape[-1], generator=gen).to(out.device)[..., ::2]
    raise ValueError(kind)


def check_strided_grad_outputs(ours, ref, x, gen):
    """Gradients of ours equal ref's for an expanded (stride 0, from out.sum().backward()), a
    transposed and a sliced upstream gradient."""
    for kind in ("sum", "transposed", "sliced"):
        leaf, ref_leaf = x.detach().requires_grad_(), x.detach().requires_grad_()
        out, rout = ours(leaf), ref(ref_leaf)
        if kind == "sum":
            out.sum().backward()
            rout.sum().backward()
        else:
            g = strided_grad_output(out, kind, gen)
            out.backward(g)
            rout.backward(g)
        assert_close(leaf.grad, ref_leaf.grad)


def check_layout_preserved(ours, x, layout, gen):
    """A contiguous input gives contiguous results, a channels_last one channels_last results
    (inference forward, training forward and gradient)."""
    fmt = torch.contiguous_format if layout == "contiguous" else channels_last_format(x.dim())
    with torch.no_grad():
        assert ours(x, 2).is_contiguous(memory_format=fmt)
    out, grad, _ = run_fwd_grad(lambda t: ours(t, 3, 2, 1), x, gen)
    assert out.is_contiguous(memory_format=fmt)
    assert grad.is_contiguous(memory_format=fmt)


def check_one_cell_output_layout(ours, ref, x, gen, dtype=None):
    """A channels_last input pooled to a single output cell, an output that is contiguous as well:
    the gradient is still channels_last (the backward is told the layout, not left to guess it
    from grad_output), and the output and gradient equal ref's."""
    k, rd = x.shape[2], ref_dtype(x.dtype)
    out, grad, g = run_fwd_grad(lambda t: ours(t, k), x, gen)
    rout, rgrad, _ = run_fwd_bwd(lambda t: ref(t, k), x.to(rd), g=g.to(rd))
    assert out.is_contiguous() and out.shape[2:] == (1,) * (x.dim() - 2)
    assert grad.is_contiguous(memory_format=channels_last_format(x.dim()))
    assert not grad.is_contiguous()
    assert_close(out, rout.to(x.dtype), dtype)
    assert_close(grad, rgrad.to(x.dtype), dtype)


def check_backward_deterministic(ours, ref, x, gen, reference_device=None):
    """Two backward runs of ours are bit-identical, and match ref's gradient (computed on
    reference_device, default x's device)."""
    _, g1, g = run_fwd_bwd(ours, x, gen=gen)
    _, g2, _ = run_fwd_bwd(ours, x, g=g)
    assert torch.equal(g1, g2)
    dev = reference_device or x.device
    _, gr, _ = run_fwd_bwd(ref, x.to(dev), g=g.to(dev))
    assert_close(g1.to(dev), gr)


# --- hypothesis strategies ----------------------------------------------------------------------

HYPOTHESIS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pool_output_size(size, k, s, p, d, ceil_mode):
    """torch's output size for symmetric padding p (ceil mode drops a window starting past the input)."""
    num = size + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def every_window_touches_input(size, k, s, p, d, ceil_mode):
    """False when a dilated window falls entirely into the padding (torch then returns an index
    outside the input and its backward writes out of bounds, so there is nothing to compare)."""
    out = pool_output_size(size, k, s, p, d, ceil_mode)
    return all(any(0 <= o * s - p + j * d < size for j in range(k)) for o in range(out))


ROW_END_WINDOWS = [
    dict(kernel_size=2, stride=1),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=8, stride=1, padding=4, ceil_mode=True),
    dict(kernel_size=2, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=7, stride=2, padding=3, ceil_mode=True),
]


def row_end_widths(kw):
    """Row widths 1 to 40 for which the window geometry is valid (the row-end tests)."""
    k, s, p = kw["kernel_size"], kw["stride"], kw.get("padding", 0)
    ceil = kw.get("ceil_mode", False)
    return [w for w in range(1, 41) if pool_output_size(w, k, s, p, 1, ceil) >= 1
            and every_window_touches_input(w, k, s, p, 1, ceil)]


def draw_dtype_layout(draw, shape, batched):
    """shape, a dtype, and a layout that applies to `shape` (unbatched inputs: none of the 4d/5d ones)."""
    layouts = layouts_for(len(shape)) if batched else layouts_for(0)
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(layouts)))


def _maybe_int(draw, values):
    """A per-dim tuple, or the plain int when all values are equal (both spellings are tested)."""
    values = tuple(values)
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return values


@st.composite
def pool_cases(draw, kind):
    """A random valid pooling configuration within torch's rules (padding <= kernel // 2, output >= 1).

    Returns a dict: nd, shape, dtype, layout, seed, kw (keyword arguments for the functional API,
    understood by both torchpool and torch.nn.functional).
    """
    nd = draw(st.integers(1, 3))
    maxk = {1: 5, 2: 4, 3: 3}[nd]
    kernel = [draw(st.integers(1, maxk)) for _ in range(nd)]
    stride = draw(st.one_of(st.none(), st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    padding = [draw(st.integers(0, k // 2)) for k in kernel]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)] if kind == "max" else [1] * nd
    sizes = []
    for k, p, d in zip(kernel, padding, dilation):
        lo = max(1, d * (k - 1) + 1 - 2 * p)
        if kind == "avg" and nd == 3:
            lo = max(lo, k)  # F.avg_pool3d also rejects an input smaller than the kernel
        sizes.append(draw(st.integers(lo, lo + 5)))
    stride_ = kernel if stride is None else stride
    ceil_mode = draw(st.booleans())
    assume(all(every_window_touches_input(*a, ceil_mode) for a in zip(sizes, kernel, stride_, padding, dilation)))
    batched = draw(st.sampled_from([True, True, True, False]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    shape = ((n, c) if batched else (c,)) + tuple(sizes)
    kw = dict(
        kernel_size=_maybe_int(draw, kernel),
        stride=None if stride is None else _maybe_int(draw, stride),
        padding=_maybe_int(draw, padding),
        ceil_mode=ceil_mode,
    )
    if kind == "max":
        kw["dilation"] = _maybe_int(draw, dilation)
    else:
        kw["count_include_pad"] = draw(st.booleans())
        kw["divisor_override"] = draw(st.sampled_from([None, None, None, 1, 3, 7]))
    return dict(nd=nd, **draw_dtype_layout(draw, shape, batched), seed=draw(st.integers(0, 2**31 - 1)), kw=kw)


def python_with(code, **env):
    """Runs `code` in a fresh interpreter with the environment variables `env` set."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=120)


def assert_tests_pass_with(test_file, select, **env):
    """The tests of `test_file` (a name in this folder) that `select` picks (pytest -k) pass in a
    fresh process with the environment variables `env` set."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select],
                       env=dict(os.environ, **env), cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
