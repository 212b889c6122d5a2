"""The CPU cache of freed large outputs: a reused block holds the previous tensor's data, so every
kernel must write all of its output; the cap, the switch-off and the stats."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import torchpool
import torchpool.functional as tpf
from conftest import assert_close

MIB = 1 << 20
SHAPE = (1, 64, 256, 256)  # 16 MiB of float32 (the cache serves 1 MiB and more)


def _bwd(ours, ref):
    def grad_of(fn):
        def run(x):
            x = x.detach().requires_grad_()
            y = fn(x)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
            return torch.autograd.grad(y, x, g)[0]
        return run
    return grad_of(ours), grad_of(ref)


CASES = {
    "avg3x3 s1 forward": (lambda x: tpf.avg_pool2d(x, 3, 1, 1), lambda x: F.avg_pool2d(x, 3, 1, 1)),
    "max2x2 backward": _bwd(lambda x: tpf.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2)),
    "max3x3 s2 backward": _bwd(lambda x: tpf.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1)),
    "avg2x2 backward": _bwd(lambda x: tpf.avg_pool2d(x, 2), lambda x: F.avg_pool2d(x, 2)),
    "avg3x3 backward": _bwd(lambda x: tpf.avg_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1)),
    "global max backward": _bwd(tpf.global_max_pool2d, lambda x: F.adaptive_max_pool2d(x, 1).flatten(1)),
    "global avg backward": _bwd(tpf.global_avg_pool2d, lambda x: x.mean((2, 3))),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(CASES))
def test_reused_block_is_fully_written(rng, name, layout):
    """The second call gets the first result's block back, filled with NaN, and must still match
    torch: no kernel may rely on fresh (zeroed) pages."""
    ours, ref = CASES[name]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xs = [torch.randn(SHAPE, generator=rng).contiguous(memory_format=fmt) for _ in range(2)]
    first = ours(xs[0])
    assert first.nbytes >= 16 * MIB
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    hits = torchpool.cpu_cache_stats()["hits"]
    second = ours(xs[1])
    assert torchpool.cpu_cache_stats()["hits"] > hits
    assert second.data_ptr() == ptr
    assert_close(second, ref(xs[1]))


def test_cached_output_is_an_ordinary_tensor(rng):
    x = torch.randn(SHAPE, generator=rng)
    y = tpf.avg_pool2d(x, 3, 1, 1)
    want = F.avg_pool2d(x, 3, 1, 1)
    if "TORCHPOOL_CPU_CACHE_MB" not in os.environ:
        assert torchpool.cpu_cache_stats()["limit_bytes"] == 512 * MIB
    y.resize_(2, *SHAPE[1:])  # grows the storage through the cache's allocator, keeping the data
    assert_close(y[:1], want)
    y.add_(1)
    del y
    assert torchpool.cpu_cache_stats()["held_bytes"] >= 16 * MIB
    assert torchpool.empty_cpu_cache() >= 16 * MIB
    stats = torchpool.cpu_cache_stats()
    assert stats["held_bytes"] == 0 and stats["held_blocks"] == 0


def test_small_outputs_bypass_the_cache(rng):
    before = torchpool.cpu_cache_stats()
    tpf.max_pool2d(torch.randn(8, 64, 44, 44, generator=rng), 2)  # 0.95 MiB out
    after = torchpool.cpu_cache_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    tpf.max_pool2d(torch.randn(8, 64, 48, 48, generator=rng), 2)  # 1.1 MiB out
    after = torchpool.cpu_cache_stats()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"] + 1


def _run_with_env(value, code):
    env = dict(os.environ, TORCHPOOL_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


PROGRAM = """
import torch, torchpool, torchpool.functional as tpf
xs = [torch.randn(1, 64, 256, 256) for _ in range(3)]
outs = [tpf.avg_pool2d(x, 3, 1, 1) for x in xs]  # three 16 MiB blocks, all in use
del outs
s = torchpool.cpu_cache_stats()
print(s["limit_bytes"], s["held_blocks"], s["held_bytes"])
"""


@pytest.mark.parametrize("value, limit, blocks", [("0", 0, 0), ("40", 40 * MIB, 2), ("8", 8 * MIB, 0)])
def test_cap_from_the_environment(value, limit, blocks):
    """Freed blocks beyond the cap are unmapped, oldest first; 0 keeps none (the cache is off)."""
    r = _run_with_env(value, PROGRAM)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(limit), str(blocks), str(blocks * 16 * MIB)]


@pytest.mark.parametrize("value", ["lots", "-5", "12MB"])
def test_bad_cap_is_refused(value):
    r = _run_with_env(value, "import torch, torchpool, torchpool.functional as tpf\n"
                             "tpf.avg_pool2d(torch.randn(1, 64, 256, 256), 3, 1, 1)")
    assert r.returncode != 0
    assert f"TORCHPOOL_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '{value}'" in r.stderr
