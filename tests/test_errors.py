"""Every invalid argument raises one clear error that names the function, the argument, the value
and the rule: ValueError for bad values, TypeError for bad types, RuntimeError from the raw ops."""
import itertools
import math
import re

import pytest
import torch

import torchpool.functional as tpf
import torchpool.nn as tpnn

MAX = [("max_pool1d", 1), ("max_pool2d", 2), ("max_pool3d", 3)]
AVG = [("avg_pool1d", 1), ("avg_pool2d", 2), ("avg_pool3d", 3)]
POOLS = MAX + AVG
GLOBAL = [(f"global_{k}_pool{nd}d", nd) for k in ("max", "avg") for nd in (1, 2, 3)]


def fn(name):
    return getattr(tpf, name)


def call_pool(name, x):
    """Calls the pool `name` on x: global pools take no more arguments, the others kernel_size 2."""
    return fn(name)(x) if "global" in name else fn(name)(x, 2)


def spelled(value, nd):
    """Regex for a per-dim value as the message spells it: '(0, 0)' for 2d; '(0,)' or '0' for 1d."""
    if nd == 1:
        return rf"(\({re.escape(str(value))},?\)|{re.escape(str(value))})"
    return re.escape(str((value,) * nd))


def shape_re(shape):
    return re.escape(str(tuple(shape)))


def inp(nd, device, shape=None, dtype=torch.float32):
    return torch.randn(shape or (2, 3) + (8,) * nd, device=device).to(dtype)


@pytest.mark.parametrize("name,nd", POOLS)
@pytest.mark.parametrize("bad", [0, -1])
def test_kernel_size_not_positive(device, name, nd, bad):
    with pytest.raises(ValueError, match=rf"{name}\b.*kernel_size.*positive.*{spelled(bad, nd)}"):
        fn(name)(inp(nd, device), bad)


def test_kernel_size_message_exact(device):
    with pytest.raises(ValueError, match=re.escape("max_pool2d: kernel_size must be positive, got (0, 0)")):
        tpf.max_pool2d(inp(2, device), 0)


@pytest.mark.parametrize("name,nd", POOLS)
@pytest.mark.parametrize("bad", [0, -2])
def test_stride_not_positive(device, name, nd, bad):
    with pytest.raises(ValueError, match=rf"{name}\b.*stride.*positive.*{spelled(bad, nd)}"):
        fn(name)(inp(nd, device), 2, bad)


@pytest.mark.parametrize("name,nd", MAX)
@pytest.mark.parametrize("bad", [0, -1])
def test_dilation_not_positive(device, name, nd, bad):
    with pytest.raises(ValueError, match=rf"{name}\b.*dilation.*positive.*{spelled(bad, nd)}"):
        fn(name)(inp(nd, device), 3, 1, 0, dilation=bad)


@pytest.mark.parametrize("name,nd", POOLS)
def test_negative_padding(device, name, nd):
    with pytest.raises(ValueError, match=rf"{name}\b.*padding.*negative.*{spelled(-1, nd)}"):
        fn(name)(inp(nd, device), 3, 1, -1)


@pytest.mark.parametrize("name,nd", POOLS)
def test_padding_more_than_half_kernel(device, name, nd):
    pattern = rf"{name}\b.*padding {spelled(2, nd)} must be at most half of kernel_size {spelled(2, nd)}"
    with pytest.raises(ValueError, match=pattern):
        fn(name)(inp(nd, device), 2, 2, 2)


def test_padding_more_than_half_kernel_per_dim(device):
    with pytest.raises(ValueError, match=r"max_pool2d\b.*padding \(1, 2\).*half of kernel_size \(3, 3\)"):
        tpf.max_pool2d(inp(2, device), 3, 1, (1, 2))


@pytest.mark.parametrize("name,nd", POOLS)
def test_output_too_small(device, name, nd):
    shape = (2, 3) + (8,) * nd
    pattern = rf"{name}\b.*input of shape {shape_re(shape)} is too small for kernel_size {spelled(9, nd)}.*output would be"
    with pytest.raises(ValueError, match=pattern):
        fn(name)(inp(nd, device), 9)


def test_output_too_small_message_exact(device):
    expected = ("max_pool2d: input of shape (2, 3, 8, 8) is too small for kernel_size (9, 9) with "
                "padding (0, 0): output would be (0, 0)")
    with pytest.raises(ValueError, match=re.escape(expected)):
        tpf.max_pool2d(inp(2, device), 9)


@pytest.mark.parametrize("name,nd", MAX)
def test_output_too_small_through_dilation(device, name, nd):
    with pytest.raises(ValueError, match=rf"{name}\b.*too small"):
        fn(name)(inp(nd, device), 3, 1, 0, dilation=4)


@pytest.mark.parametrize("name,nd", POOLS + GLOBAL)
@pytest.mark.parametrize("delta", [-2, 1])
def test_wrong_number_of_dims(device, name, nd, delta):
    shape = (2, 3) + (8,) * nd
    shape = shape[-(len(shape) + delta):] if delta < 0 else (1,) * delta + shape
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=rf"{name}\b.*expected.*got shape {shape_re(shape)}"):
        call_pool(name, x)


def test_wrong_number_of_dims_message_exact(device):
    expected = "max_pool2d: expected a 3d (C, H, W) or 4d (N, C, H, W) input, got shape (8, 8)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        tpf.max_pool2d(torch.randn(8, 8, device=device), 2)


@pytest.mark.parametrize("name,nd", POOLS + GLOBAL)
@pytest.mark.parametrize("where", ["channels", "spatial", "unbatched_channels"])
def test_zero_size_non_batch_dim(device, name, nd, where):
    shape = [2, 3] + [8] * nd
    if where == "channels":
        shape[1] = 0
    elif where == "spatial":
        shape[-1] = 0
    else:
        shape = [0] + [8] * nd
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=rf"{name}\b.*{shape_re(shape)}"):
        call_pool(name, x)


@pytest.mark.parametrize(
    "name,nd,arg",
    [(name, nd, arg) for name, nd in [("max_pool2d", 2), ("avg_pool3d", 3), ("max_pool1d", 1)]
     for arg in ("kernel_size", "stride", "padding", "dilation") if not (arg == "dilation" and name.startswith("avg"))],
)
def test_wrong_tuple_length(device, name, nd, arg):
    kw = dict(kernel_size=2)
    bad = (1,) * (nd + 1)
    kw[arg] = bad
    with pytest.raises(ValueError, match=rf"{name}\b.*{arg}.*{re.escape(str(bad))}"):
        fn(name)(inp(nd, device), **kw)


@pytest.mark.parametrize("name,nd", POOLS)
def test_unknown_padding_string(device, name, nd):
    with pytest.raises(ValueError, match=r"padding must be an int, a tuple, 'same' or 'valid', got 'bogus'"):
        fn(name)(inp(nd, device), 2, padding="bogus")


@pytest.mark.parametrize("name,nd", AVG)
def test_divisor_override_zero(device, name, nd):
    with pytest.raises(ValueError, match=rf"{name}: divisor_override must be non-zero"):
        fn(name)(inp(nd, device), 2, divisor_override=0)


@pytest.mark.parametrize("name,nd", POOLS + GLOBAL)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_bad_dtype(device, name, nd, dtype):
    x = torch.ones((2, 3) + (8,) * nd, device=device, dtype=dtype)
    dname = str(dtype).replace("torch.", "")
    with pytest.raises(TypeError, match=rf"{name}\b.*input.*{dname}"):
        if "global" in name:
            fn(name)(x)
        else:
            fn(name)(x, 2)


@pytest.mark.parametrize("name,nd", MAX)
def test_same_with_dilation(device, name, nd):
    with pytest.raises(ValueError, match=rf"{name}\b.*'same'.*dilation|{name}\b.*dilation.*'same'"):
        fn(name)(inp(nd, device), 3, 1, padding="same", dilation=2)


@pytest.mark.parametrize("name,nd", POOLS)
@pytest.mark.parametrize("arg", ["kernel_size", "stride"])
def test_non_int_kernel_and_stride(device, name, nd, arg):
    kw = dict(kernel_size=2)
    kw[arg] = 2.5
    with pytest.raises(TypeError, match=rf"{name}\b.*{arg}.*2\.5"):
        fn(name)(inp(nd, device), **kw)


@pytest.mark.parametrize("name,nd", POOLS)
def test_non_int_padding(device, name, nd):
    with pytest.raises(TypeError, match=r"padding.*1\.5"):
        fn(name)(inp(nd, device), 3, padding=1.5)


def test_modules_report_errors(device):
    x = inp(2, device)
    with pytest.raises(ValueError, match=r"kernel_size.*positive"):
        tpnn.MaxPool2d(0)(x)
    with pytest.raises(ValueError, match=r"padding must be an int, a tuple, 'same' or 'valid', got 'bogus'"):
        tpnn.AvgPool2d(2, padding="bogus")(x)
    with pytest.raises(ValueError, match=r"divisor_override must be non-zero"):
        tpnn.AvgPool2d(2, divisor_override=0)(x)
    with pytest.raises(ValueError, match=r"expected.*got shape \(8, 8\)"):
        tpnn.GlobalAvgPool2d()(torch.randn(8, 8, device=device))


# The raw ops check their arguments too (a clear RuntimeError, never a crash).
def test_raw_ops_check_arguments(device):
    ops = torch.ops.torchpool
    x = inp(2, device)
    one = [1, 1]
    with pytest.raises(RuntimeError, match=r"kernel_size must be positive"):
        ops.max_pool(x, [0, 2], [1, 1], [0, 0], [0, 0], one, False)
    with pytest.raises(RuntimeError, match=r"stride must be positive"):
        ops.avg_pool(x, [2, 2], [0, 1], [0, 0], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match=r"dilation must be positive"):
        ops.max_pool_with_pos(x, [2, 2], [1, 1], [0, 0], [0, 0], [1, 0], False)
    with pytest.raises(RuntimeError, match=r"kernel_size"):
        ops.max_pool(x, [2, 2, 2], [1, 1], [0, 0], [0, 0], one, False)
    with pytest.raises(RuntimeError, match=r"too small"):
        ops.avg_pool(x, [9, 9], [1, 1], [0, 0], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match=r"float16, bfloat16, float32 or float64"):
        ops.max_pool(x.to(torch.int32), [2, 2], [2, 2], [0, 0], [0, 0], one, False)
    with pytest.raises(RuntimeError, match=r"spatial"):
        ops.global_avg_pool(torch.randn(8, device=device))
    with pytest.raises(RuntimeError, match=r"zero-size"):
        ops.global_max_pool(torch.randn(2, 0, 4, device=device))


def test_raw_backward_ops_check_shapes(device):
    ops = torch.ops.torchpool
    x = inp(2, device)
    out, pos = ops.max_pool_with_pos(x, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False)
    bad = torch.randn(2, 3, 3, 4, device=device)
    with pytest.raises(RuntimeError, match=r"shape"):
        ops.max_pool_backward(bad, pos, list(x.shape), [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"shape"):
        ops.avg_pool_backward(bad, list(x.shape), [2, 2], [2, 2], [0, 0], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match=r"shape"):
        ops.global_avg_pool_backward(torch.randn(2, 4, device=device), list(x.shape), False)


def test_raw_backward_ops_check_channels_last(device):
    """The backward ops' channels_last needs a 2d or 3d pool's input (4 or 5 dims); told, it sets
    grad_input's layout, even where grad_output's (one output cell) could be either."""
    ops = torch.ops.torchpool
    x = torch.randn(2, 3, 8, device=device)
    out, pos = ops.max_pool_with_pos(x, [2], [2], [0], [0], [1], False)
    g, size = torch.randn_like(out), list(x.shape)
    rule = r": channels_last needs a 2d or 3d pool input, got shape \(2, 3, 8\)"
    with pytest.raises(RuntimeError, match="max_pool_backward" + rule):
        ops.max_pool_backward(g, pos, size, [2], [2], [0], [0], [1], False, True)
    with pytest.raises(RuntimeError, match="avg_pool_backward" + rule):
        ops.avg_pool_backward(g, size, [2], [2], [0], [0], False, True, None, True)
    gg, gpos = ops.global_max_pool_with_pos(x)
    with pytest.raises(RuntimeError, match="global_max_pool_backward" + rule):
        ops.global_max_pool_backward(gg, gpos, size, True)
    with pytest.raises(RuntimeError, match="global_avg_pool_backward" + rule):
        ops.global_avg_pool_backward(gg, size, True)
    # A 2d pool to one output cell: grad_output is contiguous and channels_last at once.
    x = torch.randn(2, 3, 2, 2, device=device)
    out, pos = ops.max_pool_with_pos(x, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False)
    g, size = torch.randn_like(out), list(x.shape)
    leaf = x.clone().requires_grad_()
    torch.nn.functional.max_pool2d(leaf, 2).backward(g)
    for told in (None, False, True):
        ours = ops.max_pool_backward(g, pos, size, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False, told)
        avg = ops.avg_pool_backward(g, size, [2, 2], [2, 2], [0, 0], [0, 0], False, True, None, told)
        fmt = torch.channels_last if told else torch.contiguous_format
        for grad in (ours, avg):
            assert grad.is_contiguous(memory_format=fmt) and grad.is_contiguous() == (not told)
        assert torch.equal(ours, leaf.grad) and (ours != 0).sum() == g.numel()
        assert torch.equal(avg, g.expand(-1, -1, 2, 2) / 4)


@pytest.mark.parametrize("spatial,bad", [((6, 6), 36), ((6, 6), 200), ((20, 20), 400), ((20, 20), -1)])
def test_raw_global_max_backward_checks_cells(device, spatial, bad):
    """Saved cells given to the global max backward outside their planes (of 36 cells: uint8
    positions on the CPU; of 400: int32) are refused with the value and the rule, not written out
    of bounds. The CPU checks in a pass of its own, other devices with the ATen ops of
    _check_global_positions, which the CPU runs here too."""
    ops = torch.ops.torchpool
    x = torch.randn(4, 5, *spatial, device=device)
    out, pos = ops.global_max_pool_with_pos(x)
    cells = spatial[0] * spatial[1]
    g = torch.randn_like(out)
    wrong = pos.clone()
    wrong[2, 3] = bad
    wrong[3, 1] = cells  # a later one: the first is named
    rule = rf"pos must hold cells in \[0, {cells}\) \(planes of {cells} cells\), got {bad} at flat index 13"
    with pytest.raises(RuntimeError, match="global_max_pool_backward: " + rule):
        ops.global_max_pool_backward(g, wrong, list(x.shape), False)
    with pytest.raises(RuntimeError, match="_check_global_positions: " + rule):
        ops._check_global_positions(wrong, list(x.shape))
    # The saved cells the forward gives pass, with or without the check, and the gradient is
    # torch's adaptive max's.
    ops._check_global_positions(pos, list(x.shape))
    # The private check refuses what is not a tensor of cells for the input's planes.
    shape_rule = r"_check_global_positions: pos must be an integer tensor of shape \(4, 5\) "
    with pytest.raises(RuntimeError, match=shape_rule + rf"\(the cells of planes of {cells}\), got Float of shape \(4, 5\)"):
        ops._check_global_positions(pos.float(), list(x.shape))
    with pytest.raises(RuntimeError, match=shape_rule + r".*got \w+ of shape \(4, 4\)"):
        ops._check_global_positions(pos[:, :4], list(x.shape))
    with pytest.raises(RuntimeError, match=r"_check_global_positions: expected an input with 1 to 3 spatial dims"):
        ops._check_global_positions(pos, [4, 5])
    grad = ops.global_max_pool_backward(g, pos, list(x.shape), False)
    assert torch.equal(grad, ops.global_max_pool_backward(g, pos, list(x.shape), False, check_pos=False))
    leaf = x.clone().requires_grad_()
    torch.nn.functional.adaptive_max_pool2d(leaf, 1).flatten(1).backward(g)
    assert torch.equal(grad, leaf.grad) and (grad != 0).sum() == g.numel()


def test_raw_backward_ops_check_position_dtypes(device):
    """The saved positions must have the dtype the forward gives them: a window's position in one
    byte up to 256 cells (int32 above), the global max's cell in the plane's narrowest dtype on
    the CPU (int64 on CUDA)."""
    ops = torch.ops.torchpool
    x = inp(2, device)
    shape = list(x.shape)
    out, pos = ops.max_pool_with_pos(x, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False)
    assert pos.dtype == torch.uint8
    with pytest.raises(RuntimeError, match=r"max_pool_backward: pos must have dtype Byte for a window of 4 cells, got Long"):
        ops.max_pool_backward(out, pos.long(), shape, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False)
    gout, gpos = ops.global_max_pool_with_pos(x)
    want = torch.uint8 if device == "cpu" else torch.int64
    assert gpos.dtype == want
    wrong = gpos.int()
    with pytest.raises(RuntimeError, match=r"global_max_pool_backward: pos must be a (Byte|Long) tensor of shape "
                                           r"\(2, 3\) \(the cells of planes of \d+\), got Int"):
        ops.global_max_pool_backward(gout, wrong, shape, False)


# (input's spatial size, kernel, stride, pad_before, pad_after, dilation, ceil_mode): borders cut
# on every side, asymmetric ('same'-style) padding, dilation, 3d, and windows of more than 256
# cells (int32 positions).
WINDOW_CASES = [
    ((11,), [3], [2], [1], [1], [1], True),
    ((9, 10), [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], False),
    ((7, 9), [2, 3], [2, 2], [0, 1], [1, 1], [1, 1], False),
    ((10, 11), [3, 3], [2, 2], [1, 1], [1, 1], [2, 2], True),
    ((5, 6, 7), [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], True),
    ((2,), [2], [1], [1], [1], [3], False),  # the one window misses the input
    ((17, 18), [16, 17], [4, 4], [8, 8], [8, 8], [1, 1], False),
]


def window_cell_input(case, out_at, k):
    """Where window cell k of the output at spatial index out_at lies in the input (per dim), and
    whether the window has a cell inside the input in every dim."""
    size, kernel, stride, pad, _, dilation, _ = case
    cell, coords, hits = [], [], True
    for kk in reversed(kernel):
        cell.insert(0, k % kk)
        k //= kk
    for d in range(len(size)):
        starts = [out_at[d] * stride[d] - pad[d] + j * dilation[d] for j in range(kernel[d])]
        hits = hits and any(0 <= c < size[d] for c in starts)
        coords.append(starts[cell[d]])
    return coords, hits


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1][0]}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_raw_max_backward_checks_positions(device, case, channels_last):
    """A saved window position given to max_pool_backward or max_pool_indices must name a cell of
    its window that lies inside the input: one outside the window, or on a cell in the padding,
    is refused with its index, its value and the rule. Every other one sends its gradient to that
    cell (and gives its flat index), computed here from the geometry; an output whose window
    misses the input (torch gives it -inf) sends none, whatever it names. check_pos=False (the
    autograd's, for the forward's own positions) skips the check and changes nothing else. The
    CPU checks in passes of its own, other devices with the ATen ops of _check_max_positions,
    which the CPU runs here too."""
    size, kernel = case[0], case[1]
    nd = len(size)
    if channels_last and nd == 1:
        pytest.skip("no channels_last for 1d")
    ops = torch.ops.torchpool
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    geometry = list(case[1:])
    out, pos = ops.max_pool_with_pos(x, *geometry)
    cells = math.prod(kernel)
    assert pos.dtype == (torch.uint8 if cells <= 256 else torch.int32)
    # Every output of plane (1, 2), all of its window's cells where they are few, and a spread of
    # them otherwise, with the values just past each end of the range.
    outputs = list(itertools.product(*(range(n) for n in out.shape[2:])))
    if cells > 256:
        outputs, tried = outputs[:3] + outputs[-2:], list(range(0, cells, 7)) + [cells - 1, cells, -1]
    else:
        tried = list(range(cells)) + [cells, 255]
    for out_at in outputs:
        for k in tried:
            wrong = pos.clone()
            wrong[(1, 2) + out_at] = k
            g = torch.zeros_like(out)
            g[(1, 2) + out_at] = 1.5
            index = re.escape(str([1, 2, *out_at]))
            if not 0 <= k < cells:
                rule = rf"pos must hold window cells in \[0, {cells}\) \(windows of {cells} cells\); pos{index} is {k}"
                raised = True
            else:
                coords, hits = window_cell_input(case, out_at, k)
                inside = all(0 <= c < n for c, n in zip(coords, size))
                rule = (r"pos must name window cells inside the input, not in its padding; "
                        rf"pos{index} is {k}, window cell \(.*\), which lies at "
                        + re.escape(str(tuple(coords))).replace(",\\)", ",?\\)"))
                raised = hits and not inside
            if raised:
                with pytest.raises(RuntimeError, match="max_pool_backward: " + rule):
                    ops.max_pool_backward(g, wrong, list(x.shape), *geometry)
                with pytest.raises(RuntimeError, match="max_pool_indices: " + rule):
                    ops.max_pool_indices(wrong, list(x.shape), *geometry)
                with pytest.raises(RuntimeError, match="_check_max_positions: " + rule):
                    ops._check_max_positions(wrong, list(x.shape), *geometry)
                continue
            ops._check_max_positions(wrong, list(x.shape), *geometry)
            grad = ops.max_pool_backward(g, wrong, list(x.shape), *geometry)
            assert torch.equal(grad, ops.max_pool_backward(g, wrong, list(x.shape), *geometry, check_pos=False))
            want = torch.zeros(x.shape, device=device)
            if hits:
                want[(1, 2) + tuple(coords)] = 1.5
            assert torch.equal(grad, want), (out_at, k)
            if hits:
                flat = ops.max_pool_indices(wrong, list(x.shape), *geometry)[(1, 2) + out_at]
                assert flat == sum(c * math.prod(size[d + 1:]) for d, c in enumerate(coords))


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1][0]}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_raw_max_backward_names_the_first_misplaced_position(device, case, channels_last):
    """With several misplaced positions, the error names the first in memory order (channels-last:
    channels innermost), one outside its window before any in the padding, however far apart.
    The expected one is found here by walking the positions in that order."""
    size, kernel = case[0], case[1]
    nd = len(size)
    if channels_last and nd == 1:
        pytest.skip("no channels_last for 1d")
    ops = torch.ops.torchpool
    cells = math.prod(kernel)
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    gen = torch.Generator().manual_seed(len(size) * 100 + kernel[0])
    x = torch.randn(3, 4, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=fmt)
    geometry = list(case[1:])
    out, pos = ops.max_pool_with_pos(x, *geometry)
    out_shape = list(out.shape[2:])
    spatial = list(itertools.product(*(range(n) for n in out_shape)))
    # Every logical index in memory order.
    if channels_last:
        order = [(n, c, *s) for n in range(3) for s in spatial for c in range(4)]
    else:
        order = [(n, c, *s) for n in range(3) for c in range(4) for s in spatial]
    padded = [(at, k) for at in spatial for k in range(cells)
              if window_cell_input(case, at, k)[1]
              and not all(0 <= c < n for c, n in zip(window_cell_input(case, at, k)[0], size))]
    highest = 255 if pos.dtype == torch.uint8 else cells + 1000
    for _ in range(8):
        wrong = pos.clone()
        planted = {}
        for _ in range(int(torch.randint(1, 5, (), generator=gen))):
            i = order[int(torch.randint(len(order), (), generator=gen))]
            if not padded or torch.rand((), generator=gen) < 0.4:  # outside the window
                v = int(torch.randint(cells, highest + 1, (), generator=gen))
            else:
                at, v = padded[int(torch.randint(len(padded), (), generator=gen))]
                i = i[:2] + at
            wrong[i] = v
            planted[i] = v
        outside = [i for i in order if not 0 <= planted.get(i, 0) < cells]
        misplaced = [i for i in order if i in planted and (not 0 <= planted[i] < cells or (
            window_cell_input(case, i[2:], planted[i])[1]
            and not all(0 <= c < n for c, n in zip(window_cell_input(case, i[2:], planted[i])[0], size))))]
        first = (outside or misplaced)[0]
        index = re.escape(str(list(first)))
        rule = rf": pos must .*; pos{index} is {planted[first]}(,|$)"
        with pytest.raises(RuntimeError, match="max_pool_backward" + rule):
            ops.max_pool_backward(torch.ones_like(out), wrong, list(x.shape), *geometry)
        with pytest.raises(RuntimeError, match="max_pool_indices" + rule):
            ops.max_pool_indices(wrong, list(x.shape), *geometry)
        with pytest.raises(RuntimeError, match="_check_max_positions" + rule):
            ops._check_max_positions(wrong, list(x.shape), *geometry)


@pytest.mark.parametrize("channels_last", [False, True])
def test_raw_max_check_of_many_positions(device, channels_last):
    """More than the 4 Mi positions the ATen check takes a round: a misplaced position found in a
    later round is named by its own index, and one outside its window wins over an earlier one in
    the padding there too."""
    ops = torch.ops.torchpool
    size, geometry = [4, 16, 599, 1199], ([3, 3], [2, 2], [1, 1], [1, 1], [1, 1], False)
    pos = torch.full((4, 16, 300, 600), 4, dtype=torch.uint8, device=device)  # the centre: inside
    if channels_last:
        pos = pos.contiguous(memory_format=torch.channels_last)
    for f in (ops.max_pool_indices, ops._check_max_positions):
        f(pos, size, *geometry)
    pos[3, 5, 0, 77] = 1  # window cell (0, 1) of the first output row: input row -1
    rule = r"pos\[3, 5, 0, 77\] is 1, window cell \(0, 1\), which lies at \(-1, 154\)"
    for name in ("max_pool_indices", "_check_max_positions"):
        with pytest.raises(RuntimeError, match=name + ": pos must name window cells inside the input.*" + rule):
            getattr(ops, name)(pos, size, *geometry)
    pos[3, 9, 299, 599] = 9
    for name in ("max_pool_indices", "_check_max_positions"):
        with pytest.raises(RuntimeError, match=name + r": pos must hold window cells .*; pos\[3, 9, 299, 599\] is 9$"):
            getattr(ops, name)(pos, size, *geometry)
