"""Benchmark runner: checks torchpool against torch, then times torchpool, torch eager and
torch.compile on the same inputs in the same process, against ceilings measured in the same run.

    python -m benchmarks.run --device cpu
    python -m benchmarks.run --device cuda --dtype float32 bfloat16 --cases 'resnet-*' global-avg

Method (DESIGN §5):
* correctness first: torchpool's output and input gradient are compared with torch's (the case's
  first eager equivalent, run in float64 on the same values); a case that fails is not timed for
  torchpool. torch.compile that fails to compile reads n/a.
* every contender runs on the same random inputs (never zeros), rotating through enough input
  buffers that together they are 3x the last-level cache (L3 / GPU L2), one cursor for all
  contenders so that no sample reads buffers another has just read; warm-up, then rounds in
  which each contender takes one sample, in an order shuffled each round (so drift on a busy
  machine hits all of them alike, and none always follows the same contender); a sample is as
  many calls as make it >= --min-sample seconds; median, p25/p75 and min/max over samples. CUDA
  samples are timed with events. Backward is timed on a fresh graph per call, its forward
  untimed.
* bytes per call: input read once + output written once; training forward adds the tensors saved
  for backward that are neither the input nor the output (measured with saved_tensors_hooks, so
  torch eager's int64 indices count for torch eager and a 1-byte window position for torchpool);
  backward reads grad_out and those saved tensors and writes grad_in; fwd_bwd is the sum.
* ceilings: a large copy_ into a preallocated tensor (read + write) and a large sum (read),
  measured before the run and again before each case; a case's % figures use the ones measured
  just before it (a shared machine's bandwidth drifts during a run).
"""
import argparse
import fnmatch
import gc
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import report
from benchmarks.suite import CASES, DEFAULT_DTYPES, DTYPES, MODES, SUITE, memory_format

ROOT = Path(__file__).resolve().parent.parent
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
              torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}
SETTINGS = {  # per device: full run, and --quick
    "cpu": dict(warmup=3, repeat=30, min_repeat=10, min_sample_s=2e-3, budget_s=8.0, ceiling_mib=256),
    "cuda": dict(warmup=10, repeat=50, min_repeat=20, min_sample_s=1e-3, budget_s=5.0, ceiling_mib=1024),
}
QUICK = dict(warmup=1, repeat=5, min_repeat=3, min_sample_s=1e-3, budget_s=1.0, ceiling_mib=64)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: float32 on cpu, float32 bfloat16 on cuda")
    p.add_argument("--cases", nargs="+", help="case names or glob patterns (default: the whole suite)")
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"),
                   help="restrict to these layouts (default: each case's own)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeat", type=int, help="samples per contender (default: 30 cpu, 50 cuda, 5 with --quick)")
    p.add_argument("--warmup", type=int, help="warm-up calls per contender")
    p.add_argument("--min-sample", type=float, help="seconds; calls per sample are chosen to reach it")
    p.add_argument("--budget", type=float, help="seconds per case and mode, all contenders together; "
                   "caps the repeat count for slow contenders (never below a minimum)")
    p.add_argument("--quick", action="store_true", help="few repeats and small ceiling buffers: a quick look, not a result")
    p.add_argument("--batch", type=int, help="override N for every case (e.g. a tiny smoke run)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its column reads n/a)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--standin", action="store_true",
                   help="time torch.nn.functional in torchpool's place, to exercise the harness without the "
                        "extension; results are labelled and named '-standin'")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    p.add_argument("--name", help="results file name (default: <cpu model or gpu name>-<device>)")
    p.add_argument("--merge", action="store_true",
                   help="keep the results of an earlier run in the same results file for the cases this run does not "
                        "redo (a long run split into several calls); each result names its run")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    return p.parse_args(argv)


# ---------------------------------------------------------------- contenders


def load_functional(standin):
    """torchpool.functional, or with --standin a torch-only namespace with the same functions."""
    if not standin:
        import torchpool
        import torchpool.functional as tpf
        kernels = torchpool.cpu_kernels() if hasattr(torchpool, "cpu_kernels") else None
        return tpf, {"torchpool": getattr(torchpool, "__version__", None),
                     "torchpool_file": getattr(torchpool, "__file__", None), "cpu_kernels": kernels,
                     "standin": False}
    ns = types.SimpleNamespace()
    for d in (1, 2, 3):
        dims = tuple(range(2, 2 + d))
        setattr(ns, f"max_pool{d}d", getattr(F, f"max_pool{d}d"))
        setattr(ns, f"avg_pool{d}d", getattr(F, f"avg_pool{d}d"))
        adaptive = getattr(F, f"adaptive_max_pool{d}d")
        setattr(ns, f"global_max_pool{d}d",
                lambda x, keepdim=False, a=adaptive: a(x, 1) if keepdim else a(x, 1).flatten(1))
        setattr(ns, f"global_avg_pool{d}d", lambda x, keepdim=False, dims=dims: x.mean(dims, keepdim=keepdim))
    return ns, {"torchpool": None, "torchpool_file": None, "standin": True}


# ---------------------------------------------------------------- machine


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_info():
    info = {"git_commit": _git("rev-parse", "HEAD"), "csrc_tree": _git("rev-parse", "HEAD:csrc")}
    status = _git("status", "--porcelain", "--", "csrc", "torchpool", "setup.py")
    info["sources_dirty"] = bool(status) if status is not None else None
    if info["csrc_tree"] is None or info["sources_dirty"]:
        import hashlib  # no commit, or uncommitted changes: identify csrc by its content
        h = hashlib.sha1()
        for f in sorted((ROOT / "csrc").rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
        info["csrc_content_sha1"] = h.hexdigest()
    return info


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(device):
    if device == "cuda":
        model = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cache = getattr(props, "L2_cache_size", 0) or 60 * 2**20
        extra = {"gpu": model, "sm": f"{props.major}.{props.minor}", "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        cache = _cpu_llc_bytes()
        extra = {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count()}
    return dict(model=model, device=device, slug=f"{slug(model)}-{device}", cache_bytes=cache,
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                **extra)


def _cpu_llc_bytes():
    """Largest cache of cpu0 from sysfs (the L3 on x86); 32 MiB when unknown."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return best or 32 * 2**20


# ---------------------------------------------------------------- timing


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _quantile(sorted_xs, q):
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


class Call:
    """What one contender runs: `run(i, state)` is timed; `prep(i)` (optional) builds its state first,
    untimed, on input buffer i."""

    def __init__(self, run, prep=None):
        self.run, self.prep = run, prep


def _sample(call, first, n, nbuf, device):
    """Seconds for n calls on buffers first, first+1, ... (mod nbuf), counting only `run`."""
    if call.prep is None:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for j in range(n):
                call.run((first + j) % nbuf, None)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for j in range(n):
            call.run((first + j) % nbuf, None)
        return time.perf_counter() - t0
    total, events = 0.0, []
    for j in range(n):
        i = (first + j) % nbuf
        state = call.prep(i)
        if device == "cuda":  # the start event fires once the prep kernels are done
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call.run(i, state)
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            call.run(i, state)
            total += time.perf_counter() - t0
        del state
    if events:
        events[-1][1].synchronize()
        total = sum(s.elapsed_time(e) for s, e in events) / 1e3
    return total


def measure(calls, nbuf, device, cfg):
    """Times each contender's Call; returns {label: stats in seconds per call}.

    Warm-up, then rounds: in each round every contender takes one sample, in an order shuffled
    each round by a seeded generator (a fixed rotation gives each contender the same predecessor
    in almost every sample, which biased some comparisons by a few %: NOTES §103). A sample is
    `inner` consecutive calls on rotating buffers, enough to last cfg["min_sample_s"]; rounds are
    capped by cfg["budget_s"] but never fewer than cfg["min_repeat"].
    """
    labels = list(calls)
    if not labels:
        return {}
    est, wall = {}, {}
    warm = max(1, cfg["warmup"])
    # One cursor for all contenders: each sample starts on the buffer after the last one any
    # contender used, so none reads buffers another has just pulled into the cache (on a machine
    # whose last-level cache holds a few inputs, a per-contender cursor let every contender after
    # the first in a round read from the cache).
    cursor = 0
    for lab in labels:
        _sync(device)
        t0 = time.perf_counter()
        est[lab] = max(_sample(calls[lab], cursor, warm, nbuf, device) / warm, 1e-7)
        _sync(device)
        wall[lab] = (time.perf_counter() - t0) / warm  # prep included: for the time budget
        cursor = (cursor + warm) % nbuf
    inner = {lab: max(1, math.ceil(cfg["min_sample_s"] / est[lab])) for lab in labels}
    round_s = sum(inner[lab] * wall[lab] for lab in labels)
    rounds = max(cfg["min_repeat"], min(cfg["repeat"], int(cfg["budget_s"] / round_s)))
    samples = {lab: [] for lab in labels}
    order = random.Random(0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for lab in order.sample(labels, len(labels)):
                n = inner[lab]
                samples[lab].append(_sample(calls[lab], cursor, n, nbuf, device) / n)
                cursor = (cursor + n) % nbuf
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for lab in labels:
        xs = sorted(samples[lab])
        out[lab] = dict(median_s=_quantile(xs, 0.5), p25_s=_quantile(xs, 0.25), p75_s=_quantile(xs, 0.75),
                        min_s=xs[0], max_s=xs[-1], samples=len(xs), calls_per_sample=inner[lab])
    return out


def measure_ceilings(device, cfg):
    n = cfg["ceiling_mib"] * 2**20 // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    with torch.no_grad():
        stats = measure({"copy": Call(lambda i, _: dst.copy_(src)), "sum": Call(lambda i, _: src.sum())},
                        1, device, cfg)
    nbytes = src.numel() * src.element_size()
    stats["copy"]["bytes"], stats["sum"]["bytes"] = 2 * nbytes, nbytes
    for s in stats.values():
        s["gbps"] = s["bytes"] / s["median_s"] / 1e9
    del src, dst
    return stats


# ---------------------------------------------------------------- correctness and saved tensors


def run_saving(fn, x):
    """fn(x) with grad, recording what autograd saves; returns (y, saved-tensor summary)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    aliased = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    new, tensors = {}, []
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        alias = ptr in aliased
        tensors.append(dict(dtype=str(t.dtype).replace("torch.", ""), shape=list(t.shape),
                            nbytes=t.numel() * t.element_size(), alias="input/output" if alias else None))
        if not alias:
            new[ptr] = t.untyped_storage().nbytes()
    return y, dict(new_bytes=sum(new.values()), tensors=tensors)


def compare(what, got, want, dtype, exact):
    """got (in `dtype`) against torch's float64 result `want`: exact, or within `dtype`'s tolerance."""
    if not isinstance(got, torch.Tensor):
        return f"{what}: got {type(got).__name__}, expected a tensor"
    if got.shape != want.shape or got.dtype != dtype:
        return f"{what}: got {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {dtype}"
    rtol, atol = (0.0, 0.0) if exact else TOLERANCES[dtype]
    try:
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)
    except AssertionError as e:
        return f"{what}: " + " ".join(str(e).split())[:300]
    return None


def check(fn, x, g, ref, modes, exact_forward):
    """Compares fn on (x, g) with torch's float64 results; returns (problems, notes, saved summary).

    Max forward must match exactly (it picks an input value); averages and gradients within the
    dtype's tolerance of the float64 result (torch's own bfloat16 kernels may round differently)."""
    dtype = x.dtype
    problems, notes, saved = [], [], None
    try:
        if "infer" in modes:
            with torch.no_grad():
                y = fn(x)
            problems.append(compare("inference output", y, ref["y"], dtype, exact_forward))
            if isinstance(y, torch.Tensor) and y.is_contiguous() != ref["y"].is_contiguous():
                notes.append(f"output strides {y.stride()} differ in layout from torch's {ref['y'].stride()}")
        if set(modes) - {"infer"}:
            y, saved = run_saving(fn, x)
            problems.append(compare("training output", y, ref["y"], dtype, exact_forward))
            if {"bwd", "fwd_bwd"} & set(modes):
                (gx,) = torch.autograd.grad(y, x, g)
                problems.append(compare("grad_input", gx, ref["gx"], dtype, exact=False))
    except Exception as e:  # a contender that raises is reported, never crashes the run
        problems.append(f"raised {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return [p for p in problems if p], notes, saved


# ---------------------------------------------------------------- one case variant


def _call(fn, mode, X, G):
    if mode in ("infer", "train_fwd"):
        return Call(lambda i, _: fn(X[i]))
    if mode == "fwd_bwd":
        return Call(lambda i, _: torch.autograd.grad(fn(X[i]), X[i], G[i]))
    # bwd: a fresh graph for each call, built untimed (a compiled backward may run once per graph)
    return Call(lambda i, y: torch.autograd.grad(y, X[i], G[i]), prep=lambda i: fn(X[i]))


def mode_bytes(mode, in_b, out_b, saved_b):
    fwd = in_b + out_b + (0 if mode == "infer" else saved_b)
    bwd = out_b + saved_b + in_b
    return {"infer": fwd, "train_fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def run_variant(case, dtype_name, layout, functional, args, cfg, machine, ceilings):
    device, dtype = args.device, DTYPES[dtype_name]
    shape = case.shape_for(device, args.batch)
    mf = memory_format(layout, case.ndim)
    res = dict(case=case.name, op=case.op, params=case.params, describe=case.describe(), dtype=dtype_name,
               layout=layout, shape=list(shape), suite_shape=list(case.shape),
               n_scale=case.cpu_scale if device == "cpu" and args.batch is None else 1,
               problems=[], notes=[], saved={}, compile={}, modes={})
    eager = case.torch_eager()
    ref_fn = next(iter(eager.values()))

    def new_input():
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=mf).requires_grad_(True)

    # Inputs: random, rotated through enough buffers to exceed the last-level cache.
    x0 = new_input()
    with torch.no_grad():
        y_probe = ref_fn(x0)
    in_b = x0.numel() * x0.element_size()
    out_b = y_probe.numel() * y_probe.element_size()
    nbuf = max(2, min(64, math.ceil(3 * machine["cache_bytes"] / (in_b + out_b))))
    X = [x0] + [new_input() for _ in range(nbuf - 1)]
    G = [torch.randn_like(y_probe) for _ in range(nbuf)]
    res.update(buffers=nbuf, input_bytes=in_b, output_bytes=out_b)

    # The reference: torch eager in float64 on the same values (upcasting is exact, so a max picks
    # the same cell); and what each torch equivalent saves for backward in the timed dtype.
    x64 = X[0].detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        y64 = ref_fn(x64)
    ref = {"y": y64.detach(), "gx": torch.autograd.grad(y64, x64, G[0].to(torch.float64))[0]}
    del x64, y64
    for lab, fn in eager.items():
        res["saved"][f"eager:{lab}"] = run_saving(fn, X[0])[1]

    # Correctness first: torchpool is timed only when it matches torch.
    tp_fn = None
    try:
        tp_fn = case.torchpool_fn(functional)
    except AttributeError as e:
        res["problems"].append(f"missing op: {e}")
    if tp_fn is not None:
        problems, notes, saved = check(tp_fn, X[0], G[0], ref, args.modes, exact_forward=case.is_max)
        res["problems"] += problems
        res["notes"] += notes
        if saved:
            res["saved"]["torchpool"] = saved
        if problems:
            tp_fn = None

    # torch.compile of each torch equivalent: n/a when it fails; a result that differs is reported.
    compiled = {}
    if not args.no_compile:
        for lab, fn in eager.items():
            t0 = time.perf_counter()
            try:
                cfn = torch.compile(fn, fullgraph=True, dynamic=False, mode=args.compile_mode)
            except Exception as e:
                res["compile"][lab] = dict(status="n/a", reason=f"{type(e).__name__}: {e}"[:300])
                continue
            problems, _, saved = check(cfn, X[0], G[0], ref, args.modes, exact_forward=case.is_max)
            raised = [p for p in problems if p.startswith("raised")]
            if raised:
                res["compile"][lab] = dict(status="n/a", reason=raised[0])
                continue
            res["compile"][lab] = dict(status="ok", first_calls_s=round(time.perf_counter() - t0, 2))
            if problems:  # torch's own result: timed anyway, and the difference reported
                res["notes"].append(f"torch.compile {lab} differs from the float64 reference: " + "; ".join(problems))
            if saved:
                res["saved"][f"compile:{lab}"] = saved
            compiled[lab] = cfn

    # Timing, mode by mode; every contender gets the same buffers.
    def saved_b(key):
        return res["saved"].get(key, {}).get("new_bytes", 0)

    for mode in args.modes:
        contenders = {}
        if tp_fn is not None:
            contenders["torchpool"] = tp_fn
        contenders.update({f"eager:{lab}": fn for lab, fn in eager.items()})
        contenders.update({f"compile:{lab}": fn for lab, fn in compiled.items()})
        with torch.set_grad_enabled(mode != "infer"):
            calls = {key: _call(fn, mode, X, G) for key, fn in contenders.items()}
            stats = measure(calls, nbuf, device, cfg)
            del calls
        for key, s in stats.items():
            s["bytes"] = mode_bytes(mode, in_b, out_b, saved_b(key))
            s["gbps"] = s["bytes"] / s["median_s"] / 1e9
            s["pct_copy"] = 100 * s["gbps"] / ceilings["copy"]["gbps"]
            s["pct_read"] = 100 * s["gbps"] / ceilings["sum"]["gbps"]
        entry = {"torchpool": stats.get("torchpool"), "all": stats}
        for who in ("eager", "compile"):
            mine = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith(who + ":")}
            if mine:
                best = min(mine, key=lambda k: mine[k]["median_s"])
                entry[who] = dict(mine[best], impl=best)
            else:
                entry[who] = None
            tp = entry["torchpool"]
            entry[f"speedup_{who}"] = (entry[who]["median_s"] / tp["median_s"]) if tp and entry[who] else None
        res["modes"][mode] = entry
        _sync(device)
    del X, G, ref, x0, y_probe
    return res


# ---------------------------------------------------------------- main


def select_cases(patterns):
    if not patterns:
        return list(SUITE)
    chosen = []
    for pat in patterns:
        hits = [c for c in SUITE if fnmatch.fnmatchcase(c.name, pat)]
        if not hits:
            raise SystemExit(f"no suite case matches {pat!r}; cases: {', '.join(CASES)}")
        chosen += [c for c in hits if c not in chosen]
    return chosen


def progress_line(i, total, case, res):
    shape = "×".join(map(str, res["shape"]))
    scale = f" N÷{res['n_scale']:g}" if res["n_scale"] != 1 else ""
    head = f"[{i:>2}/{total}] {case.name:<15} {res['dtype']:<8} {res['layout']:<13} {shape}{scale}"
    if res["problems"]:
        return f"{head}  WRONG: {res['problems'][0][:160]}"
    parts = []
    for mode, e in res["modes"].items():
        tp = e["torchpool"]
        if tp is None:
            continue
        se = f"×{e['speedup_eager']:.2f}" if e["speedup_eager"] else "n/a"
        sc = f"×{e['speedup_compile']:.2f}" if e["speedup_compile"] else "n/a"
        parts.append(f"{mode} {report.fmt_time(tp['median_s'])} {tp['pct_read']:.0f}% {se}/{sc}")
    return f"{head}  ok  " + " | ".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        functional, impl_info = load_functional(args.standin)
    except ImportError as e:
        raise SystemExit(f"torchpool is not importable ({e}); build it first "
                         "(pip install -e . --no-build-isolation), or pass --standin to exercise the harness alone")
    cfg = dict(QUICK if args.quick else SETTINGS[args.device])
    for key, val in (("repeat", args.repeat), ("warmup", args.warmup), ("min_sample_s", args.min_sample),
                     ("budget_s", args.budget)):
        if val is not None:
            cfg[key] = val
    cfg["min_repeat"] = min(cfg["min_repeat"], cfg["repeat"])
    dtypes = args.dtype or list(DEFAULT_DTYPES[args.device])
    cases = select_cases(args.cases)
    variants = [(c, d, lay) for c in cases for d in dtypes for lay in c.layouts
                if not args.layouts or lay in args.layouts]

    machine = machine_info(args.device)
    name = args.name or machine["slug"] + ("-standin" if args.standin else "")
    meta = dict(machine=machine, **impl_info, **source_info(), name=name,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                command="python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv),
                settings=dict(cfg, modes=args.modes, dtypes=dtypes, batch=args.batch, quick=args.quick,
                              compile=not args.no_compile, compile_mode=args.compile_mode),
                load_average_start=_loadavg())
    print(f"torchpool benchmarks on {machine['model']} ({args.device}), torch {torch.__version__}, "
          f"{machine['threads']} threads, load average {meta['load_average_start']}")
    load = meta["load_average_start"]
    if load and load[0] > 0.25 * (os.cpu_count() or 1):
        meta["warnings"] = [f"load average {load[0]:.1f} on {os.cpu_count()} cores at the start: other processes "
                            "were running, so timings are noisy"]
        print("WARNING: " + meta["warnings"][0])
    if args.standin:
        print("STAND-IN: torch.nn.functional is timed in torchpool's place; these are not torchpool results")
    if args.device == "cpu" and args.batch is None:
        print("CPU run: N is scaled down per case (N÷k shown on each line)")
    if args.batch is not None:
        print(f"N overridden to {args.batch} for every case")
    base = report.load(args.out, name) if args.merge else None
    if base and (base["machine"]["model"], base["machine"]["device"], base.get("standin")) != \
            (machine["model"], machine["device"], args.standin):
        raise SystemExit(f"--merge: {args.out / name}.json holds results of another machine or kind of run")
    if base:
        print(f"--merge: keeping the results in {args.out / name}.json that this run does not redo")
    torch.manual_seed(0)
    ceilings = measure_ceilings(args.device, cfg)
    print(f"ceilings: copy {ceilings['copy']['gbps']:.1f} GB/s (read+write), sum {ceilings['sum']['gbps']:.1f} GB/s (read); "
          "measured again before each case, whose % figures use those")
    print("per mode: torchpool median, % of read ceiling, speedup vs eager / vs compile")

    results = []
    for i, (case, dtype, layout) in enumerate(variants, 1):
        if not args.no_compile:
            from torch import _dynamo
            _dynamo.reset()  # each case compiles afresh: no recompile limits, no stale guards
        # The bandwidth of a shared machine drifts during a run: each case is set against the
        # ceilings measured just before it.
        case_ceilings = measure_ceilings(args.device, cfg)
        try:
            res = run_variant(case, dtype, layout, functional, args, cfg, machine, case_ceilings)
        except Exception as e:  # e.g. out of memory: reported as a failed case, the run goes on
            res = dict(case=case.name, op=case.op, params=case.params, describe=case.describe(), dtype=dtype,
                       layout=layout, shape=list(case.shape_for(args.device, args.batch)),
                       suite_shape=list(case.shape), n_scale=1, notes=[], saved={}, compile={}, modes={},
                       problems=[f"harness error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"])
        res["ceilings_gbps"] = {k: v["gbps"] for k, v in case_ceilings.items()}
        results.append(res)
        print(progress_line(i, len(variants), case, res), flush=True)
        # written after every case, so a run that is stopped keeps what it measured
        report.write_all(report.assemble(meta, ceilings, results, base), args.out, plot=False)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    meta["load_average_end"] = _loadavg()
    doc = report.assemble(meta, ceilings, results, base)
    paths = report.write_all(doc, args.out, plot=not args.no_plot)
    print()
    for line in report.summary_lines(doc["summary"], modes=report.HEADLINE_MODES):
        print(line)
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r for r in results if r["problems"]]
    if failed:
        print(f"{len(failed)} case(s) failed (wrong result or error): " + ", ".join(
            f"{r['case']} {r['dtype']} {r['layout']}" for r in failed))
    return 1 if failed else 0


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
