"""Smoke test of the benchmark runner: one tiny case, few repeats, on the CPU, into a temporary folder."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
from benchmarks import report, run  # noqa: E402
from benchmarks.suite import CASES, SUITE  # noqa: E402


def _torchpool_importable():
    try:
        import torchpool.functional  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("standin", [
    pytest.param(False, id="torchpool", marks=pytest.mark.skipif(
        not _torchpool_importable(), reason="torchpool is not built")),
    pytest.param(True, id="standin"),
])
def test_runner_writes_results(tmp_path, standin, capsys):
    argv = ["--device", "cpu", "--quick", "--batch", "2", "--repeat", "3", "--cases", "mnist-pool",
            "--no-compile", "--no-plot", "--out", str(tmp_path), "--name", "smoke"]
    assert run.main(argv + (["--standin"] if standin else [])) == 0
    out = capsys.readouterr().out
    assert "mnist-pool" in out and "ceilings" in out and "geomean infer" in out

    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["standin"] is standin
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["threads"] >= 1
    assert doc["machine"]["torch"]
    for key in ("git_commit", "csrc_tree", "date", "command"):
        assert key in doc
    assert doc["ceilings"]["copy"]["gbps"] > 0 and doc["ceilings"]["sum"]["gbps"] > 0
    (res,) = doc["results"]
    assert res["case"] == "mnist-pool" and res["shape"] == [2, 32, 26, 26] and not res["problems"]
    assert set(res["modes"]) == {"infer", "train_fwd", "bwd", "fwd_bwd"}
    for mode, entry in res["modes"].items():
        tp = entry["torchpool"]
        assert 0 < tp["p25_s"] <= tp["median_s"] <= tp["p75_s"] and tp["samples"] >= 3
        assert tp["gbps"] > 0 and entry["speedup_eager"] > 0 and entry["compile"] is None
        # % of the ceilings measured just before the case
        assert tp["pct_read"] == pytest.approx(100 * tp["gbps"] / res["ceilings_gbps"]["sum"])
        assert tp["pct_copy"] == pytest.approx(100 * tp["gbps"] / res["ceilings_gbps"]["copy"])
    # Bytes: inference reads the input and writes the output; fwd_bwd adds the saved index twice.
    in_b, out_b = 2 * 32 * 26 * 26 * 4, 2 * 32 * 13 * 13 * 4
    saved = res["saved"]["torchpool"]["new_bytes"]
    assert res["modes"]["infer"]["torchpool"]["bytes"] == in_b + out_b
    assert res["modes"]["fwd_bwd"]["torchpool"]["bytes"] == 2 * (in_b + out_b + saved)
    assert res["saved"]["eager:F.max_pool2d"]["new_bytes"] == 2 * 32 * 13 * 13 * 8  # int64 indices
    assert doc["summary"]["modes"]["infer"]["all"]["geomean_vs_eager"] > 0

    md = (tmp_path / "smoke.md").read_text()
    assert "| mnist-pool | max 2×2 s2 | 2×32×26×26 |" in md
    assert "before each case (its % figures use those)" in md
    assert "## Geomean speedups" in md and "## Saved for backward" in md
    assert ("Stand-in run" in md) is standin

    # --merge: an earlier document's other results are kept, each naming its run.
    other = dict(res, dtype="float64", run=0)
    merged = report.assemble(doc, doc["ceilings"], [res], base=dict(doc, results=[other, res]))
    assert [(r["dtype"], r["run"]) for r in merged["results"]] == [("float32", 1), ("float64", 0)]
    assert len(merged["runs"]) == 2 and "## Runs" in report.markdown(merged)


def test_suite_matches_design():
    assert len({c.name for c in SUITE}) == len(SUITE)
    assert CASES["resnet-stem"].layouts == ("contiguous", "channels_last")
    assert CASES["resnet-stem"].describe() == "max 3×3 s2 p1"
    assert CASES["inception-avg"].describe() == "avg 3×3 s1 p1 excl-pad"
    assert CASES["vgg-pool"].shape_for("cuda") == (64, 128, 112, 112)
    assert CASES["vgg-pool"].shape_for("cpu") == (8, 128, 112, 112)
    assert list(CASES["global-max"].torch_eager()) == ["adaptive_max_pool2d(1)", "amax"]
