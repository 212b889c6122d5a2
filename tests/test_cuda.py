"""CUDA-specific behaviour: the current stream, a tensor on a device other than the current one,
channels_last_3d, more than 2^31 elements, bf16 gradients, the vectorized channels-last paths,
the global-pool reduction paths, exact parity with the CPU kernels, and deterministic backward."""
import pytest
import torch
import torch.nn.functional as F

import torchpool
import torchpool.functional as tpf
from conftest import (
    assert_close,
    grad_output_like,
    make_input,
    ref_dtype,
    run_fwd_bwd,
    torch_avg_pool2d,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OPS = torch.ops.torchpool
MAX = {1: tpf.max_pool1d, 2: tpf.max_pool2d, 3: tpf.max_pool3d}
AVG = {1: tpf.avg_pool1d, 2: tpf.avg_pool2d, 3: tpf.avg_pool3d}
GMAX = {1: tpf.global_max_pool1d, 2: tpf.global_max_pool2d, 3: tpf.global_max_pool3d}
GAVG = {1: tpf.global_avg_pool1d, 2: tpf.global_avg_pool2d, 3: tpf.global_avg_pool3d}
F_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
F_AVG = {1: F.avg_pool1d, 2: torch_avg_pool2d, 3: F.avg_pool3d}


def spatial(nd, x):
    return tuple(range(x.dim() - nd, x.dim()))


def f_gmax(nd):
    """Global max whose gradient goes to the first maximum (amax would split it among ties)."""
    def fn(t):
        flat = t.flatten(t.dim() - nd)
        return flat.gather(-1, flat.detach().argmax(-1, keepdim=True)).squeeze(-1)
    return fn


def f_gavg(nd):
    return lambda t: t.mean(dim=spatial(nd, t))


def cl_format(dim):
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def misaligned_channels_last(x):
    """The same values in channels-last order, starting one element past an aligned address."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    strides = torch.empty_like(x, memory_format=cl_format(x.dim())).stride()
    y = buf[1:].as_strided(x.shape, strides)
    y.copy_(x)
    assert y.is_contiguous(memory_format=cl_format(x.dim()))
    assert y.data_ptr() % 16 != 0
    return y


def compare_with_torch(ours, ref, x, gen, exact_values=False):
    """Forward values and input gradients of ours vs torch's reference (run on the float32 upcast
    input for half types). The upstream gradient has the output's layout, so backward runs in it."""
    dtype, rd = x.dtype, ref_dtype(x.dtype)
    leaf = x.detach().requires_grad_()
    out = ours(leaf)
    g = torch.empty_like(out).copy_(grad_output_like(out, gen))
    out.backward(g)
    rleaf = x.detach().to(rd).requires_grad_()
    rout = ref(rleaf)
    rout.backward(g.to(rd))
    assert out.device == x.device and leaf.grad.device == x.device
    assert_close(out, rout.detach().to(dtype), dtype, exact=exact_values)
    assert_close(leaf.grad, rleaf.grad.to(dtype), dtype)
    return out, leaf.grad


def test_built_with_cuda():
    assert torchpool.cuda_built(), "torchpool was built without its CUDA kernels"


# --- streams and devices ------------------------------------------------------------------------

STREAM_CASES = [
    ("max_pool2d", lambda t: tpf.max_pool2d(t, 3, 2, 1)),
    ("max_pool2d_indices", lambda t: tpf.max_pool2d(t, 3, 2, 1, return_indices=True)[0]),
    ("avg_pool2d", lambda t: tpf.avg_pool2d(t, 3, 2, 1, count_include_pad=False)),
    ("global_max_pool2d", lambda t: tpf.global_max_pool2d(t)),
    ("global_avg_pool2d", lambda t: tpf.global_avg_pool2d(t)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,fn", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_runs_on_the_current_stream(rng, name, fn, layout):
    """Work queued on a side stream before the op must be visible to it: the kernels run on the
    current stream (a kernel on the default stream would read the input before it is written)."""
    src = make_input((4, 16, 96, 96), torch.float32, "cuda", layout, rng)
    ref_out, ref_grad, g = run_fwd_bwd(fn, src, gen=rng)
    x = torch.full_like(src, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # keeps the side stream busy for a while
        x.copy_(src)
        leaf = x.detach().requires_grad_()
        out = fn(leaf)
        out.backward(g)
    side.synchronize()
    assert torch.equal(out, ref_out)
    assert torch.equal(leaf.grad, ref_grad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name,fn", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_tensor_on_another_device(rng, name, fn):
    """Input on cuda:1 while cuda:0 is current: kernels run on the input's device."""
    assert torch.cuda.current_device() == 0
    x = make_input((2, 8, 33, 35), torch.float32, "cuda:1", "contiguous", rng)
    out, grad, g = run_fwd_bwd(fn, x, gen=rng)
    assert out.device == x.device and grad.device == x.device
    ref_out, ref_grad, _ = run_fwd_bwd(fn, x.to("cuda:0"), g=g.to("cuda:0"))
    assert torch.equal(out.cpu(), ref_out.cpu())
    assert torch.equal(grad.cpu(), ref_grad.cpu())
    assert torch.cuda.current_device() == 0


# --- layouts and vector paths -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [3, 8, 16])
def test_channels_last_3d(rng, dtype, channels):
    x = make_input((2, channels, 6, 7, 8), dtype, "cuda", "channels_last", rng, kind="distinct")
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    cases = [
        (lambda t: tpf.max_pool3d(t, 3, 2, 1), lambda t: F.max_pool3d(t, 3, 2, 1), True),
        (lambda t: tpf.max_pool3d(t, 2), lambda t: F.max_pool3d(t, 2), True),
        (lambda t: tpf.max_pool3d(t, (2, 3, 2), 1, (1, 1, 0), dilation=(2, 1, 2)),
         lambda t: F.max_pool3d(t, (2, 3, 2), 1, (1, 1, 0), dilation=(2, 1, 2)), True),
        (lambda t: tpf.avg_pool3d(t, 3, 2, 1, count_include_pad=False),
         lambda t: F.avg_pool3d(t, 3, 2, 1, count_include_pad=False), False),
        (lambda t: tpf.avg_pool3d(t, 3, 1, 1, ceil_mode=True, divisor_override=5),
         lambda t: F.avg_pool3d(t, 3, 1, 1, ceil_mode=True, divisor_override=5), False),
        (GMAX[3], f_gmax(3), True),
        (GAVG[3], f_gavg(3), False),
    ]
    for ours, ref, exact in cases:
        out, grad = compare_with_torch(ours, ref, x, rng, exact_values=exact)
        assert grad.is_contiguous(memory_format=torch.channels_last_3d)
        if out.dim() == 5:
            assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [2, 4, 8, 12, 24, 64])
@pytest.mark.parametrize("aligned", [True, False])
def test_channels_last_vector_widths(rng, dtype, channels, aligned):
    """Channel counts and alignments that take the 16-byte vector path or fall back to scalar."""
    x = make_input((2, channels, 13, 11), dtype, "cuda", "contiguous", rng, kind="distinct")
    x = x.contiguous(memory_format=torch.channels_last) if aligned else misaligned_channels_last(x)
    for ours, ref, exact in [
        (lambda t: tpf.max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1), True),
        (lambda t: tpf.max_pool2d(t, 2, ceil_mode=True), lambda t: F.max_pool2d(t, 2, ceil_mode=True), True),
        (lambda t: tpf.avg_pool2d(t, 3, 1, 1), lambda t: torch_avg_pool2d(t, 3, 1, 1), False),
        (lambda t: tpf.avg_pool2d(t, 2, 2, 1, count_include_pad=False),
         lambda t: torch_avg_pool2d(t, 2, 2, 1, count_include_pad=False), False),
    ]:
        out, grad = compare_with_torch(ours, ref, x, rng, exact_values=exact)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grad.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, idx = tpf.max_pool2d(x, 3, 2, 1, return_indices=True)
        picked = x.flatten(2).gather(-1, idx.flatten(2))
        assert torch.equal(picked, out.flatten(2))


# --- global pools: every reduction path ---------------------------------------------------------

GLOBAL_SHAPES = [
    ((2, 3, 5, 5), "contiguous"),        # a warp per (n, c)
    ((3, 4, 3), "contiguous"),           # 8 lanes per (n, c)
    ((2, 5, 1), "contiguous"),           # a single cell
    ((4, 6, 40, 40), "contiguous"),      # a block per (n, c)
    ((1, 2, 300, 300), "contiguous"),    # the cells split over blocks, then combined
    ((4, 300, 20, 20), "channels_last"),  # channel tiles, the last one partial
    ((2, 3, 100, 100), "channels_last"),  # many lanes per channel, split cells
    ((2, 5, 9, 30, 30), "channels_last"),
]


@pytest.mark.parametrize("shape,layout", GLOBAL_SHAPES, ids=[f"{s}-{l}" for s, l in GLOBAL_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_global_pool_paths(rng, shape, layout, dtype):
    nd = len(shape) - 2
    x = make_input(shape, dtype, "cuda", layout, rng, kind="ties")
    compare_with_torch(GMAX[nd], f_gmax(nd), x, rng, exact_values=True)
    compare_with_torch(GAVG[nd], f_gavg(nd), x, rng)
    out, pos = OPS.global_max_pool_with_pos(x)
    flat = x.flatten(2)
    assert torch.equal(pos, flat.argmax(-1))  # the first maximum
    assert torch.equal(out, flat.amax(-1))


# --- exact parity with the CPU kernels (NaN, infinities, ties) -----------------------------------

def special_values(shape, dtype, gen):
    x = torch.randint(-2, 3, shape, generator=gen).to(torch.float32)
    u = torch.rand(shape, generator=gen)
    x[u < 0.05] = float("nan")
    x[(u >= 0.05) & (u < 0.15)] = float("-inf")
    x[(u >= 0.15) & (u < 0.18)] = float("inf")
    x.reshape(-1)[: x.numel() // 8] = float("-inf")  # some windows hold nothing but -inf
    return x.to(dtype)


MAX_GEOMETRIES = [  # kernel, stride, pad_before, pad_after, dilation, ceil_mode (2d)
    ([2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False),
    ([3, 3], [1, 1], [1, 1], [1, 1], [1, 1], False),
    ([3, 3], [2, 2], [1, 1], [1, 1], [1, 1], True),
    ([3, 2], [2, 1], [1, 0], [1, 1], [2, 3], True),
    ([17, 17], [3, 3], [8, 8], [8, 8], [1, 1], False),  # 289 cells: int32 positions
]


@pytest.mark.parametrize("geometry", MAX_GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool_ops_match_cpu_exactly(rng, geometry, dtype, layout):
    x = special_values((2, 8, 23, 21), dtype, rng)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xc = x.cuda()
    out, pos = OPS.max_pool_with_pos(xc, *geometry)
    rout, rpos = OPS.max_pool_with_pos(x, *geometry)
    assert pos.dtype == rpos.dtype
    assert_close(out.cpu(), rout, exact=True, equal_nan=True)
    assert torch.equal(pos.cpu(), rpos)
    assert_close(OPS.max_pool(xc, *geometry).cpu(), rout, exact=True, equal_nan=True)
    size = list(x.shape)
    idx = OPS.max_pool_indices(pos, size, *geometry)
    assert torch.equal(idx.cpu(), OPS.max_pool_indices(rpos, size, *geometry))
    g = grad_output_like(rout, rng)
    gin = OPS.max_pool_backward(g.cuda(), pos, size, *geometry)
    rgin = OPS.max_pool_backward(g, rpos, size, *geometry)
    assert_close(gin.cpu(), rgin, dtype)


@pytest.mark.parametrize("shape,layout", GLOBAL_SHAPES, ids=[f"{s}-{l}" for s, l in GLOBAL_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_global_max_matches_cpu_exactly(rng, shape, layout, dtype):
    """Positions with NaN (the last NaN wins, as a sequential scan), -inf and ties."""
    x = special_values(shape, dtype, rng)
    if layout == "channels_last":
        x = x.contiguous(memory_format=cl_format(x.dim()))
    out, pos = OPS.global_max_pool_with_pos(x.cuda())
    rout, rpos = OPS.global_max_pool_with_pos(x)
    assert_close(out.cpu(), rout, exact=True, equal_nan=True)
    assert pos.dtype == torch.int64  # the CPU saves the cells in the plane's narrowest dtype
    assert torch.equal(pos.cpu(), rpos.long())
    assert_close(OPS.global_max_pool(x.cuda()).cpu(), rout, exact=True, equal_nan=True)
    g = grad_output_like(rout, rng)
    cl = layout == "channels_last"
    gin = OPS.global_max_pool_backward(g.cuda(), pos, list(shape), cl)
    assert torch.equal(gin.cpu(), OPS.global_max_pool_backward(g, rpos, list(shape), cl))


# --- bf16 gradients -----------------------------------------------------------------------------

BF16_CASES = [
    ("max_pool2d", 4, lambda t: tpf.max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1)),
    ("max_pool2d_dilated", 4, lambda t: tpf.max_pool2d(t, 3, 1, 1, dilation=2),
     lambda t: F.max_pool2d(t, 3, 1, 1, dilation=2)),
    ("max_pool3d", 5, lambda t: tpf.max_pool3d(t, 3, 2, 1), lambda t: F.max_pool3d(t, 3, 2, 1)),
    ("max_pool1d", 3, lambda t: tpf.max_pool1d(t, 3, 2), lambda t: F.max_pool1d(t, 3, 2)),
    ("avg_pool2d", 4, lambda t: tpf.avg_pool2d(t, 3, 1, 1, count_include_pad=False),
     lambda t: torch_avg_pool2d(t, 3, 1, 1, count_include_pad=False)),
    ("avg_pool3d", 5, lambda t: tpf.avg_pool3d(t, 2, ceil_mode=True), lambda t: F.avg_pool3d(t, 2, ceil_mode=True)),
    ("avg_pool1d", 3, lambda t: tpf.avg_pool1d(t, 4, 2, 2), lambda t: F.avg_pool1d(t, 4, 2, 2)),
    ("global_max_pool2d", 4, GMAX[2], f_gmax(2)),
    ("global_avg_pool2d", 4, GAVG[2], f_gavg(2)),
    ("global_avg_pool3d", 5, GAVG[3], f_gavg(3)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,dim,ours,ref", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_gradients(rng, name, dim, ours, ref, layout):
    if layout == "channels_last" and dim == 3:
        pytest.skip("no channels_last for 3d tensors")
    shape = {3: (4, 16, 300), 4: (4, 16, 30, 31), 5: (2, 16, 9, 10, 11)}[dim]
    x = make_input(shape, torch.bfloat16, "cuda", layout, rng)
    compare_with_torch(ours, ref, x, rng, exact_values=name.startswith(("max", "global_max")))


# --- more than 2^31 elements --------------------------------------------------------------------

def need_free_memory(gib):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements_fp16(layout):
    """64-bit indexing: the last rows (past element 2^31) match torch on a slice."""
    need_free_memory(24)
    shape = (1, 2, 32768, 32776) if layout == "contiguous" else (1, 8, 16384, 16394)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(shape, dtype=torch.float16, device="cuda",
                    memory_format=torch.contiguous_format if layout == "contiguous" else torch.channels_last)
    x.normal_(mean=0.5, generator=gen)  # a mean far from 0 for the average
    assert x.numel() > 2**31
    H = shape[2]

    with torch.no_grad():
        # max 3x3 s2 p1: the last 8 output rows read input rows H-17.. (no bottom padding used).
        out = tpf.max_pool2d(x, 3, 2, 1)
        tail = x[:, :, H - 17:, :]
        ref = F.max_pool2d(tail, 3, 2, padding=(0, 1))
        assert torch.equal(out[:, :, -8:, :], ref)
        del out
        out = tpf.avg_pool2d(x, 2)
        assert_close(out[:, :, -8:, :], F.avg_pool2d(x[:, :, H - 16:, :], 2), torch.float16)
        del out
        gmax, gpos = OPS.global_max_pool_with_pos(x)
        gavg = tpf.global_avg_pool2d(x)
        for c in range(shape[1]):
            plane = x[0, c]
            assert gmax[0, c] == plane.max()
            assert plane.reshape(-1)[gpos[0, c]] == plane.max()
            mean = plane.sum(dtype=torch.float32) / plane.numel()
            assert_close(gavg[0, c].float(), mean, torch.float16)
        del gmax, gpos, gavg

    # Backward of the max pool: input rows H-16.. only receive gradient from the last 8 outputs.
    leaf = x.requires_grad_()
    out = tpf.max_pool2d(leaf, 3, 2, 1)
    g = torch.empty_like(out).normal_(generator=gen)
    out.backward(g)
    del out
    tail = x.detach()[:, :, H - 17:, :].float().requires_grad_()
    F.max_pool2d(tail, 3, 2, padding=(0, 1)).backward(g[:, :, -8:, :].float())
    assert_close(leaf.grad[:, :, H - 16:, :], tail.grad[:, :, 1:, :].half(), torch.float16)


# --- determinism --------------------------------------------------------------------------------

DET_CASES = [
    ("max_pool2d_overlap", (8, 32, 64, 64), lambda t: tpf.max_pool2d(t, 3, 1, 1)),
    ("max_pool2d_dilated", (8, 32, 64, 64), lambda t: tpf.max_pool2d(t, 4, 2, 2, dilation=2)),
    ("max_pool3d_overlap", (2, 16, 24, 32, 32), lambda t: tpf.max_pool3d(t, 3, 2, 1)),
    ("avg_pool2d_overlap", (8, 32, 64, 64), lambda t: tpf.avg_pool2d(t, 5, 1, 2, count_include_pad=False)),
    ("avg_pool3d_overlap", (2, 16, 24, 32, 32), lambda t: tpf.avg_pool3d(t, 3, 1, 1)),
    ("global_max_pool2d", (4, 64, 96, 96), GMAX[2]),
    ("global_avg_pool2d", (4, 64, 96, 96), GAVG[2]),
    ("global_avg_pool3d", (2, 16, 24, 32, 32), GAVG[3]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,shape,fn", DET_CASES, ids=[c[0] for c in DET_CASES])
def test_deterministic(rng, name, shape, fn, dtype, layout):
    """Forward and backward twice: bit-identical (many ties, overlapping windows)."""
    x = make_input(shape, dtype, "cuda", layout, rng, kind="ties")
    out1, grad1, g = run_fwd_bwd(fn, x, gen=rng)
    out2, grad2, _ = run_fwd_bwd(fn, x, g=g)
    assert torch.equal(out1, out2)
    assert torch.equal(grad1, grad2)
    assert bool((grad1 != 0).any())
