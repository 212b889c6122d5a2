"""Turns a benchmark run into benchmarks/results/<machine>.json, .md and .png, and its summary."""
import json
import math
from pathlib import Path

from benchmarks.suite import CASES, MODES

HEADLINE_MODES = ("infer", "fwd_bwd")


def fmt_time(s):
    if s is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale or unit == "µs":
            v = s / scale
            return f"{v:.{0 if v >= 100 else 1 if v >= 10 else 2}f} {unit}"


def fmt_bytes(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _x(v):
    return f"×{v:.2f}" if v else "n/a"


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _label(r, many_dtypes):
    lab = r["case"] + ("/cl" if r["layout"] == "channels_last" else "")
    return lab + (f"/{r['dtype']}" if many_dtypes else "")


# ---------------------------------------------------------------- summary


def summarize(results):
    """Geomean speedups and worst cases per mode, over all dtypes and per dtype."""
    dtypes = sorted({r["dtype"] for r in results})
    modes = {}
    for mode in MODES:
        timed = [r for r in results if mode in r["modes"] and r["modes"][mode]["torchpool"]]
        if not timed:
            continue
        per = {}
        for key in ["all"] + (dtypes if len(dtypes) > 1 else []):
            rows = [r for r in timed if key in ("all", r["dtype"])]
            entries = [(r, r["modes"][mode]) for r in rows]
            vs_e = [e["speedup_eager"] for _, e in entries if e["speedup_eager"]]
            vs_c = [e["speedup_compile"] for _, e in entries if e["speedup_compile"]]
            worst = min(entries, key=lambda re: re[1]["torchpool"]["pct_read"])
            per[key] = dict(
                cases=len(rows),
                geomean_vs_eager=geomean(vs_e), cases_vs_eager=len(vs_e),
                geomean_vs_compile=geomean(vs_c), cases_vs_compile=len(vs_c),
                lowest_pct_read=worst[1]["torchpool"]["pct_read"],
                lowest_pct_read_case=f"{worst[0]['case']} {worst[0]['dtype']} {worst[0]['layout']}",
                slower_than_eager=[f"{r['case']} {r['dtype']} {r['layout']}" for r, e in entries
                                   if e["speedup_eager"] and e["speedup_eager"] < 1],
                slower_than_compile=[f"{r['case']} {r['dtype']} {r['layout']}" for r, e in entries
                                     if e["speedup_compile"] and e["speedup_compile"] < 1])
        modes[mode] = per
    return dict(modes=modes, failed=[f"{r['case']} {r['dtype']} {r['layout']}" for r in results if r["problems"]])


def summary_lines(summary, modes=MODES):
    lines = []
    for mode in [m for m in modes if m in summary["modes"]]:
        for key, s in summary["modes"][mode].items():
            tag = f"{mode:<9}" + (f" {key}" if key != "all" else "")
            comp = (f"{_x(s['geomean_vs_compile'])} vs compile ({s['cases_vs_compile']} cases)"
                    if s["geomean_vs_compile"] else "compile n/a")
            lines.append(f"geomean {tag}: {_x(s['geomean_vs_eager'])} vs eager ({s['cases_vs_eager']} cases), "
                         f"{comp}; lowest {s['lowest_pct_read']:.0f}% of read ceiling ({s['lowest_pct_read_case']}); "
                         f"slower than eager: {', '.join(s['slower_than_eager']) or 'none'}")
    if summary["failed"]:
        lines.append("FAILED (wrong result or error; torchpool not timed): " + ", ".join(summary["failed"]))
    return lines


# ---------------------------------------------------------------- files


RUN_KEYS = ("date", "command", "git_commit", "csrc_tree", "csrc_content_sha1", "sources_dirty", "torchpool",
            "standin", "settings", "load_average_start", "load_average_end", "warnings")


def load(out_dir, name):
    path = Path(out_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _key(r):
    return r["case"], r["dtype"], r["layout"]


def _case_ceilings(results):
    """The range of the ceilings measured before each case (which its % figures use)."""
    sums = [r["ceilings_gbps"]["sum"] for r in results if r.get("ceilings_gbps")]
    copies = [r["ceilings_gbps"]["copy"] for r in results if r.get("ceilings_gbps")]
    if not sums:
        return ""
    return (f"; before each case (its % figures use those): copy_ {min(copies):.1f}–{max(copies):.1f}, "
            f"sum {min(sums):.1f}–{max(sums):.1f} GB/s")


def assemble(meta, ceilings, results, base=None):
    """The results document: this run's meta at the top level, its results, and with `base` (an
    earlier document of the same machine) the earlier results this run did not redo. Every result
    names its run in `runs`, whose ceilings its % figures use."""
    run = {k: meta.get(k) for k in RUN_KEYS}
    run.update(torch=meta["machine"]["torch"], ceilings_gbps={k: v["gbps"] for k, v in ceilings.items()})
    runs, kept = [], []
    if base:
        redone = {_key(r) for r in results}
        kept = [r for r in base["results"] if _key(r) not in redone]
        used = sorted({r.get("run", 0) for r in kept})
        old_runs = base.get("runs") or [{k: base.get(k) for k in RUN_KEYS}]
        runs = [old_runs[i] for i in used]
        kept = [dict(r, run=used.index(r.get("run", 0))) for r in kept]
    results = [dict(r, run=len(runs)) for r in results]
    runs.append(run)
    order = list(CASES)
    merged = sorted(kept + results, key=lambda r: (order.index(r["case"]) if r["case"] in order else len(order),
                                                   r["dtype"], r["layout"]))
    return dict(meta, ceilings=ceilings, runs=runs, results=merged, summary=summarize(merged))


def write_all(doc, out_dir, plot=True):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{doc['name']}.json", out_dir / f"{doc['name']}.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    png = out_dir / f"{doc['name']}.png" if plot else None
    if png is not None and not write_png(doc, png):
        png = None
    paths[1].write_text(markdown(doc, png.name if png else None))
    return paths + ([png] if png else [])


def _source_id(run):
    return run.get("csrc_tree") if not run.get("sources_dirty") else run.get("csrc_content_sha1")


def _source_line(doc):
    commit = (doc.get("git_commit") or "no commit")[:12]
    tree = doc.get("csrc_tree")
    src = f"commit {commit}" + (f", csrc tree {tree[:12]}" if tree else "")
    if doc.get("sources_dirty") or not tree:
        src += f" (uncommitted sources; csrc content sha1 {doc.get('csrc_content_sha1', '?')[:12]})"
    return src


def _best_cell(entry, who):
    best = entry[who]
    if not best:
        return "n/a"
    several = sum(k.startswith(who + ":") for k in entry["all"]) > 1
    return fmt_time(best["median_s"]) + (f" ({best['impl']})" if several else "")


def markdown(doc, png_name=None):
    m, cfg = doc["machine"], doc["settings"]
    res = doc["results"]
    many_dtypes = len({r["dtype"] for r in res}) > 1
    ce = doc["ceilings"]
    out = [f"# torchpool benchmarks: {m['model']} ({m['device']})", ""]
    if doc.get("standin"):
        out += ["**Stand-in run: torch.nn.functional was timed in torchpool's place. These are not torchpool "
                "results.**", ""]
    hw = (f"{m.get('gpu')}, sm {m.get('sm')}, CUDA {m.get('cuda')}" if m["device"] == "cuda"
          else f"{m.get('cpu')}, {m.get('cores')} cores, {m['threads']} threads, {m.get('cpu_capability')}")
    out += ["| | |", "|---|---|",
            f"| machine | {hw} |",
            f"| torch | {m['torch']} (python {m['python']}) |",
            f"| torchpool | {_source_line(doc)} |",
            f"| date | {doc['date']} |",
            f"| command | `{doc['command']}` |",
            f"| ceilings | copy_ {ce['copy']['gbps']:.1f} GB/s (read + write), sum {ce['sum']['gbps']:.1f} GB/s (read), "
            f"before the run{_case_ceilings(res)} |",
            f"| load average | start {doc.get('load_average_start')}, end {doc.get('load_average_end')} |",
            ""]
    notes = [f"Times: median over {cfg['repeat']} samples at most ({cfg['min_repeat']} at least), "
             "p25–p75 in brackets, after warm-up; contenders take turns, in an order shuffled each "
             "round, on the same random inputs.",
             "torch eager: the fastest of the case's torch equivalents (listed in the JSON); torch.compile: "
             "the same equivalents compiled (fullgraph).",
             "GB/s and % of ceiling are torchpool's: input read + output written, + the tensors saved for "
             "backward in training forward; backward: grad_out + saved tensors read, grad_in written; "
             "fwd_bwd: both."]
    if m["device"] == "cpu" and cfg.get("batch") is None:
        notes.append("CPU run: N is scaled down per case (N÷k in the shape column); shapes are the ones timed.")
    if cfg.get("batch") is not None:
        notes.append(f"N overridden to {cfg['batch']} for every case.")
    if cfg.get("quick"):
        notes.append("--quick: few repeats, small ceiling buffers; a quick look, not a result.")
    if not cfg.get("compile"):
        notes.append("torch.compile skipped (--no-compile).")
    notes = [f"**Warning: {w}.**" for w in doc.get("warnings", [])] + notes
    out += [f"- {n}" for n in notes] + [""]
    runs = doc.get("runs") or []
    if len(runs) > 1:
        out += ["## Runs", "", "These results come from several runs (`--merge`); each row names its run.", ""]
        if len({_source_id(r) for r in runs}) > 1:
            out += ["**Warning: the runs built different sources (see csrc below).**", ""]
        out += ["| run | date | torchpool | copy_ GB/s | sum GB/s | command |", "|---|---|---|--:|--:|---|"]
        for i, r in enumerate(runs):
            out.append(f"| {i} | {r['date']} | {_source_line(r)} | {r['ceilings_gbps']['copy']:.1f} | "
                       f"{r['ceilings_gbps']['sum']:.1f} | `{r['command']}` |")
        out.append("")
    if png_name:
        out += [f"![speedups and % of ceiling]({png_name})", ""]

    run_col = len(runs) > 1
    out += ["| case | op | shape | dtype | layout | mode | torchpool (p25–p75) | GB/s | % copy | % read "
            "| eager | compile | × eager | × compile |" + (" run |" if run_col else ""),
            "|---|---|---|---|---|---|---|--:|--:|--:|---|---|--:|--:|" + ("--:|" if run_col else "")]
    for r in res:
        shape = "×".join(map(str, r["shape"])) + (f" (N÷{r['n_scale']:g})" if r["n_scale"] != 1 else "")
        head = f"| {r['case']} | {r['describe']} | {shape} | {r['dtype']} | {r['layout']}"
        tail = f" {r.get('run', 0)} |" if run_col else ""
        for mode, e in r["modes"].items():
            tp = e["torchpool"]
            if tp:
                tcell = f"{fmt_time(tp['median_s'])} ({fmt_time(tp['p25_s'])}–{fmt_time(tp['p75_s'])})"
                nums = f"{tp['gbps']:.1f} | {tp['pct_copy']:.0f} | {tp['pct_read']:.0f}"
            else:
                tcell, nums = ("WRONG" if r["problems"] else "n/a"), "| |"
            ecell, ccell = _best_cell(e, "eager"), _best_cell(e, "compile")
            out.append(f"{head} | {mode} | {tcell} | {nums} | {ecell} | {ccell} | "
                       f"{_x(e['speedup_eager'])} | {_x(e['speedup_compile'])} |" + tail)
    out.append("")

    s = doc["summary"]
    if s["modes"]:
        out += ["## Geomean speedups", "", "| mode | dtype | × eager | × compile | lowest % of read ceiling |",
                "|---|---|--:|--:|---|"]
        for mode, per in s["modes"].items():
            for key, g in per.items():
                out.append(f"| {mode} | {key} | {_x(g['geomean_vs_eager'])} ({g['cases_vs_eager']}) | "
                           f"{_x(g['geomean_vs_compile'])} ({g['cases_vs_compile']}) | "
                           f"{g['lowest_pct_read']:.0f} ({g['lowest_pct_read_case']}) |")
        out.append("")

    out += ["## Saved for backward", "",
            "Bytes autograd keeps per call besides the input and output themselves (saved_tensors_hooks).", "",
            "| case | dtype | layout | torchpool | torch eager | torch.compile |", "|---|---|---|---|---|---|"]
    for r in res:
        cells = {"torchpool": [], "eager": [], "compile": []}
        for key, sv in r["saved"].items():
            who, _, impl = key.partition(":")
            kept = ", ".join(f"{t['dtype']} {'×'.join(map(str, t['shape']))}" for t in sv["tensors"] if not t["alias"])
            text = f"{fmt_bytes(sv['new_bytes'])}" + (f" ({kept})" if kept else "")
            cells[who].append(f"{impl}: {text}" if impl and len([k for k in r["saved"] if k.startswith(who)]) > 1 else text)
        out.append(f"| {r['case']} | {r['dtype']} | {r['layout']} | " +
                   " | ".join("; ".join(cells[w]) or "n/a" for w in ("torchpool", "eager", "compile")) + " |")
    out.append("")

    issues = [(r, p) for r in res for p in r["problems"]] + [(r, n) for r in res for n in r["notes"]]
    issues += [(r, f"torch.compile {lab}: n/a, {c['reason']}") for r in res
               for lab, c in r["compile"].items() if c["status"] != "ok"]
    if issues:
        out += ["## Problems and notes", ""]
        out += [f"- {r['case']} {r['dtype']} {r['layout']}: {p}" for r, p in issues]
        out.append("")
    return "\n".join(out)


def write_png(doc, path):
    """Speedup vs eager, vs compile and % of read ceiling per case; False when it cannot be drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed: no PNG chart")
        return False
    res = [r for r in doc["results"] if any(e["torchpool"] for e in r["modes"].values())]
    if not res:
        return False
    many = len({r["dtype"] for r in res}) > 1
    labels = [_label(r, many) for r in res]
    modes = [m for m in MODES if any(m in r["modes"] for r in res)]
    width = 0.8 / len(modes)
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.7 * len(res) + 3), 11), sharex=True)
    panels = (("speedup vs torch eager", lambda e: e["speedup_eager"], True),
              ("speedup vs torch.compile", lambda e: e["speedup_compile"], True),
              ("% of read ceiling (sum)", lambda e: e["torchpool"]["pct_read"] if e["torchpool"] else None, False))
    for ax, (title, get, log) in zip(axes, panels):
        drawn = []
        for j, mode in enumerate(modes):
            xs, ys = [], []
            for i, r in enumerate(res):
                e = r["modes"].get(mode)
                v = get(e) if e else None
                if v:
                    xs.append(i + (j - (len(modes) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=mode)
            drawn += ys
        ax.axhline(1 if log else 100, color="black", linewidth=0.8)
        if not drawn:
            ax.text(0.5, 0.7, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
        if log:
            ax.set_yscale("log")
            times = FuncFormatter(lambda v, _: f"×{v:g}")
            ax.yaxis.set_major_formatter(times)
            few = drawn and max(drawn + [1]) / min(drawn + [1]) < 20
            ax.yaxis.set_minor_formatter(times if few else NullFormatter())
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(modes), fontsize="small")
    m = doc["machine"]
    title = f"torchpool on {m['model']} ({m['device']}), torch {m['torch']}"
    if doc.get("standin"):
        title = "STAND-IN (torch timed as torchpool) — " + title
    axes[0].set_title(title, fontsize="medium")
    axes[-1].set_xticks(range(len(res)))
    axes[-1].set_xticklabels(labels, rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
