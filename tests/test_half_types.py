"""bfloat16 / float16, which the CPU kernels compute in float32 registers: forward values and
indices against torch on shapes that reach every load and store variant (rows shorter and longer
than 8 cells, windows clipped at both row ends, row tails, stride 1 and 2, 3d windows, channel
counts that end in a partial vector), the rounding back to the half type bit for bit, global
pools, and backwards against the float64 gradient."""
import pytest
import torch
import torch.nn.functional as F

import torchpool.functional as tpf
from conftest import HALF_DTYPES, assert_close, to_layout

OURS = {1: (tpf.max_pool1d, tpf.avg_pool1d), 2: (tpf.max_pool2d, tpf.avg_pool2d),
        3: (tpf.max_pool3d, tpf.avg_pool3d)}
TORCH = {1: (F.max_pool1d, F.avg_pool1d), 2: (F.max_pool2d, F.avg_pool2d),
         3: (F.max_pool3d, F.avg_pool3d)}

# (shape, kwargs): rows of 5, 13, 35 and 61 cells; padding clips the windows at both row ends;
# 45 and 72 channels: channels-last blocks of 32 channels, of 8 and a partial one.
CASES = [
    ((2, 45, 9, 12), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 72, 7, 9), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 40, 4, 5, 6), dict(kernel_size=2, stride=2)),
    ((2, 3, 13), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 3, 61), dict(kernel_size=2)),
    ((2, 5, 9, 5), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 5, 11, 35), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 5, 12, 61), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 5, 10, 26), dict(kernel_size=2, stride=2)),
    ((2, 5, 9, 37), dict(kernel_size=5, stride=1, padding=2)),
    ((2, 5, 10, 40), dict(kernel_size=(2, 4), stride=(2, 2), padding=(1, 2), ceil_mode=True)),
    ((2, 3, 6, 8, 27), dict(kernel_size=2, stride=2)),
    ((2, 3, 5, 7, 19), dict(kernel_size=3, stride=1, padding=1)),
    ((1, 2, 40, 620), dict(kernel_size=3, stride=1, padding=1)),  # planes in 3 bands of rows
    ((1, 2, 30, 700), dict(kernel_size=2, stride=1)),
]
LAYOUTS_FOR = {1: ("contiguous",), 2: ("contiguous", "channels_last"),
               3: ("contiguous", "channels_last")}


def _cases():
    for shape, kw in CASES:
        nd = len(shape) - 2
        for layout in LAYOUTS_FOR[nd]:
            yield pytest.param(shape, kw, layout, id=f"{'x'.join(map(str, shape))}-{layout}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape,kw,layout", list(_cases()))
def test_max_values_and_indices_match_torch(rng, dtype, shape, kw, layout):
    nd = len(shape) - 2
    x = to_layout((torch.randn(shape, generator=rng) * 4).to(dtype), layout)
    ours, ref = OURS[nd][0], TORCH[nd][0]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, idx = ours(x.clone().requires_grad_(grad), return_indices=True, **kw)
        rout, ridx = ref(x.float(), return_indices=True, **kw)
        assert out.dtype == dtype
        assert torch.equal(out.detach().float(), rout)  # a max is one of the inputs: exact
        assert torch.equal(idx, ridx)
    with torch.no_grad():
        assert torch.equal(ours(x, **kw).float(), rout)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape,kw,layout", list(_cases()))
def test_avg_within_half_an_ulp_of_float64(rng, dtype, shape, kw, layout, count_include_pad):
    """The float32 average rounded once: within half an ulp of the exact (float64) average, up
    to float32's own error, and equal to torch's rounded float32 average in almost every cell."""
    nd = len(shape) - 2
    x = to_layout((torch.randn(shape, generator=rng) * 4).to(dtype), layout)
    kw = dict(kw, count_include_pad=count_include_pad)
    with torch.no_grad():
        out = OURS[nd][1](x, **kw)
    exact = TORCH[nd][1](x.double(), **kw)
    assert out.dtype == dtype and out.shape == exact.shape
    # eps * 2^floor(log2|exact|): the half type's ulp at |exact| (normal values).
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(
        torch.finfo(dtype).tiny))))
    err = (out.double() - exact).abs()
    assert bool((err <= 0.5 * ulp + 1e-6 * exact.abs() + 1e-30).all()), float((err / ulp).max())
    # torch's CPU half-type pools average in float32 and round once (avg_pool3d has no float16
    # kernel, so the float32 pool rounded stands in for it).
    same = (out == TORCH[nd][1](x.float(), **kw).to(dtype)).float().mean().item()
    assert same > 0.99, same


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_rounding_to_the_half_type_is_torchs(rng, dtype, layout):
    """2x2 averages of half-type values are exact in float32 (four values, a division by 4), so
    ours must equal torch's float32 average converted by torch, bit for bit: ties to even,
    carries into the exponent, infinities and NaN."""
    x = (torch.randn(4, 16, 24, 40, generator=rng) * 8).to(dtype)
    x[0, 1, 0, 0] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    x[0, 1, 2, 3] = float("-inf")  # inf + -inf: NaN
    x = to_layout(x, layout)
    with torch.no_grad():
        out = tpf.avg_pool2d(x, 2)
    ref = F.avg_pool2d(x.float(), 2).to(dtype)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan) and bool(nan.any())
    assert torch.equal(out[~nan].view(bits), ref[~nan].view(bits))
    # Ties occur: some float32 averages lie exactly halfway between two half-type values.
    f32 = F.avg_pool2d(x.float(), 2)[~nan]
    lo = f32.to(dtype).float()
    step = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(f32.abs().clamp_min(1e-3))))
    assert bool(((f32 - lo).abs() == step / 2).any())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 5, 14, 14), (2, 3, 96, 96), (2, 4, 3, 7), (2, 45, 6, 5)])
def test_global_pools_match_torch(rng, dtype, layout, shape):
    """Global max (value, and index of the first maximum; ties are many in a half type) and
    average (float32 sum, one rounding) on planes of 21 to 9216 cells, one plane with a NaN."""
    x = (torch.randn(shape, generator=rng) * 4).to(dtype)
    x[1, 2, 1, 3] = float("nan")
    x = to_layout(x, layout)
    out = tpf.global_max_pool2d(x.clone().requires_grad_(), keepdim=True)
    rout, ridx = F.adaptive_max_pool2d(x.float(), 1, return_indices=True)
    with torch.no_grad():
        inf_out = tpf.global_max_pool2d(x)
    assert_close(out.detach().float(), rout, exact=True, equal_nan=True)
    assert_close(inf_out.float(), rout.flatten(1), exact=True, equal_nan=True)
    # The index (from the gradient's single nonzero cell) is torch's.
    xg = x.clone().requires_grad_()
    tpf.global_max_pool2d(xg).sum().backward()
    picked = xg.grad.flatten(2).float().argmax(-1)
    assert torch.equal(picked, ridx.flatten(1))
    with torch.no_grad():
        avg = tpf.global_avg_pool2d(x)
    ravg = x.float().mean((2, 3)).to(dtype)  # torch's: a float32 mean rounded once
    assert_close(avg, ravg, dtype, equal_nan=True)


BWD_CASES = [  # (shape, kwargs, layout): tiling windows (odd sizes leave cells no window covers),
    # stride-1 windows (the separable average backward), planes too large to build in cache
    # (gathered per input row), overlapping windows in channels-last
    ((2, 3, 11, 37), dict(kernel_size=2), "contiguous"),
    ((2, 3, 16, 40), dict(kernel_size=2, stride=2), "contiguous"),
    ((2, 3, 5, 9, 33), dict(kernel_size=2), "contiguous"),
    ((2, 3, 13, 35), dict(kernel_size=3, stride=1, padding=1), "contiguous"),
    ((2, 3, 9, 21), dict(kernel_size=5, stride=1, padding=2), "contiguous"),
    ((1, 2, 300, 283), dict(kernel_size=3, stride=2, padding=1), "contiguous"),
    ((1, 2, 290, 301), dict(kernel_size=3, stride=1, padding=1), "contiguous"),
    ((2, 37, 12, 20), dict(kernel_size=3, stride=2, padding=1), "channels_last"),
    ((2, 64, 9, 11), dict(kernel_size=3, stride=1, padding=1), "channels_last"),
    ((2, 5, 10, 10), dict(kernel_size=2), "channels_last"),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,kw,layout", BWD_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[2]}" for c in BWD_CASES])
def test_backward_within_half_an_ulp_of_float64(rng, dtype, kind, shape, kw, layout):
    """Each input cell's gradient, summed in float32 and rounded once: within half an ulp of the
    float64 gradient (through torch's max positions, which ours equal), plus float32's summation
    error, which is relative to the sum of the terms' magnitudes."""
    nd = len(shape) - 2
    x = to_layout((torch.randn(shape, generator=rng) * 4).to(dtype), layout)
    ours, ref = OURS[nd][kind == "avg"], TORCH[nd][kind == "avg"]
    xg = x.clone().requires_grad_()
    out = ours(xg, **kw)
    g = torch.randn(out.shape, generator=rng).to(dtype)
    out.backward(g)
    xr = x.double().requires_grad_()
    ref(xr, **kw).backward(g.double())
    exact = xr.grad
    xa = x.double().requires_grad_()
    ref(xa, **kw).backward(g.double().abs())
    magnitude = xa.grad  # the sum of |term| per cell (the same windows and positions)
    assert xg.grad.dtype == dtype and bool((exact != 0).any())
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(
        torch.finfo(dtype).tiny))))
    err = (xg.grad.double() - exact).abs()
    bound = 0.5 * ulp + 16 * 2.0 ** -24 * magnitude
    assert bool((err <= bound).all()), float((err / bound).max())
    if kind == "max":  # few terms, exact in float32: zero exactly where the exact sum is
        assert bool(((xg.grad == 0) == (exact == 0)).all())
