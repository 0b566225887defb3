"""Pictures: a pruning report's per-Linear sparsity, error and time, and the 2:4 benchmark's speed-up against M.

The drawn data are checked on the matplotlib figures (bar heights, line points), not on pixels; the CLI
paths (``llmprune prune --plot``, ``llmprune plot``, ``python -m llmprune_kernels.plots``) write real files.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from llmprune_kernels import plots
from llmprune_kernels.cli import main

ROOT = Path(__file__).resolve().parents[1]
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="matplotlib is not installed (pip install '.[plot]')")
PNG = b"\x89PNG\r\n\x1a\n"


def _report(layers: int = 3) -> dict:
    """A report shaped as build_report writes it: 7 Linears per layer, varied numbers, one missing error."""
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    linears = [{"name": f"model.layers.{i}.{k}", "shape": [64, 64], "target": "0.5", "sparsity": 0.5 + 0.01 * i,
                "nm_ok": None, "rel_error": 0.1 + 0.02 * j + 0.001 * i, "time_s": 0.01 * (j + 1), "extra": {}}
               for i in range(layers) for j, k in enumerate(kinds)]
    linears[3]["rel_error"] = None
    linears[4]["rel_error"] = "nan"  # write_json's spelling of a NaN
    return {"report_version": 1, "model": "/models/SmolLM2-135M", "method": "sparsegpt", "options": {},
            "sparsity": {"sparsity": 0.5, "n": 0, "m": 0, "label": "0.5"}, "perplexity": {"dense": 14.3, "pruned": 18.5},
            "timings_s": {"load": 1.0, "prune": 12.5}, "host": {"cpu_count": 2, "torch_threads": 2},
            "overall_sparsity": 0.51, "linears": linears, "layer_times_s": [0.3 + 0.1 * i for i in range(layers)],
            "stage_times_s": {"capture": 0.5, "statistics": 2.0, "solve": 8.0, "write": 0.0}}


def _heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


@needs_mpl
def test_report_figure_draws_each_linear_in_order():
    report = _report()
    fig = plots.report_figure(report)
    axes = fig.axes
    lin = report["linears"]
    assert _heights(axes[0]) == pytest.approx([s["sparsity"] for s in lin])
    assert _heights(axes[2]) == pytest.approx([s["time_s"] for s in lin])
    # missing and NaN errors are left out, the others drawn at their Linear's position
    errs = [(i, s["rel_error"]) for i, s in enumerate(lin) if isinstance(s["rel_error"], float)]
    assert _heights(axes[1]) == pytest.approx([e for _, e in errs])
    assert [p.get_x() + p.get_width() / 2 for p in axes[1].patches] == pytest.approx([i for i, _ in errs])
    # one colour per projection kind, the same in every layer
    colors = [p.get_facecolor() for p in axes[0].patches]
    assert colors[:7] == colors[7:14] and len(set(colors[:7])) == 7
    # one tick per decoder layer, at the middle of its 7 bars; the layer times on the twin axis
    assert [t.get_text() for t in axes[2].get_xticklabels()] == ["0", "1", "2"]
    assert list(axes[2].get_xticks()) == pytest.approx([3, 10, 17])
    twin = axes[3]
    segs = [seg for coll in twin.collections for seg in coll.get_segments()]
    assert [s[0][1] for s in segs] == pytest.approx(report["layer_times_s"])
    title = fig.get_suptitle()
    assert "SmolLM2-135M: sparsegpt 0.5" in title and "21 Linears" in title and "14.30 → 18.50" in title
    assert "prune 12.5 s (capture 0.5 s, statistics 2 s, solve 8 s)" in fig.get_supxlabel()
    _close(fig)


@needs_mpl
def test_plot_report_writes_a_small_png(tmp_path):
    import matplotlib.pyplot as plt

    out = plots.plot_report(_report(30), tmp_path / "sub" / "layers.png")  # 210 Linears, as SmolLM2-135M
    assert out == tmp_path / "sub" / "layers.png" and out.read_bytes()[:8] == PNG
    assert out.stat().st_size < 200_000
    assert plt.imread(out).shape[:2] == (800, 1100)
    assert [f.name for f in out.parent.iterdir()] == ["layers.png"]  # no temporary file left beside it
    assert plt.get_fignums() == []  # figures are closed after saving
    svg = plots.plot_report(_report(), tmp_path / "layers.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


@needs_mpl
def test_report_without_errors_or_layers_still_draws():
    report = _report(2)
    for s in report["linears"]:
        s["rel_error"] = None
        s["name"] = s["name"].replace("model.layers.", "block")  # no integer component: no layer grouping
    fig = plots.report_figure(report)
    assert _heights(fig.axes[1]) == [] and "no rel_error in this report" in fig.axes[1].texts[0].get_text()
    assert fig.axes[2].get_xlabel() == "Linear (model order)"
    _close(fig)


def test_report_errors_are_clear(tmp_path):
    eval_report = {k: v for k, v in _report().items() if k != "linears"}
    with pytest.raises(ValueError, match=r"no per-Linear results .*'llmprune eval' reports do not"):
        plots.report_figure(eval_report)
    with pytest.raises(ValueError, match=r"suffix '.jpeg'; allowed: .png, .pdf, .svg"):
        plots.plot_report(_report(), tmp_path / "x.jpeg")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not a report"):
        plots.load_json(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        plots.load_json(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.load_json(tmp_path / "missing.json")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"needs matplotlib, which is not installed; pip install "
                                          r"'llmprune_kernels\[plot\]'"):
        plots.plot_report(_report(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------- the 2:4 benchmark
def _harness_result() -> dict:
    """bench_sparse24.py's current layout: figures[i]["ratios"]."""
    figs = []
    for shape in ([64, 128], [128, 64]):
        for dtype in ("float16", "bfloat16"):
            for m in (16, 1, 256):  # out of order on purpose
                figs.append({"shape": shape, "dtype": dtype, "m": m, "ratios": {
                    "speedup_dispatched_cold_graph": 1 + m / 1000 + (dtype == "bfloat16") / 10,
                    "speedup_dispatched_cold_eager_vs_nn_linear": None if m == 256 else 0.9}})
    return {"suite": "sparse24", "env": {"gpu": "Test GPU", "torch": "2.13"}, "figures": figs}


def test_sparse24_points_from_both_result_layouts():
    pts = plots.sparse24_points(_harness_result())
    graph, eager = (label for label, *_ in plots.SPEEDUPS)
    assert sorted(pts) == [((64, 128), "bfloat16"), ((64, 128), "float16"), ((128, 64), "bfloat16"),
                           ((128, 64), "float16")]
    ms, speedups = zip(*pts[((64, 128), "float16")][graph])
    assert ms == (1, 16, 256) and speedups == pytest.approx([1.001, 1.016, 1.256])
    assert pts[((64, 128), "float16")][eager] == [(1, 0.9), (16, 0.9)]  # a missing figure is left out
    committed = json.loads((ROOT / "benchmarks" / "results" / "sparse24.json").read_text())
    pts = plots.sparse24_points(committed)
    rows = committed.get("figures") or committed["cases"]
    assert len(pts) == len({(tuple(r["shape"]), r["dtype"]) for r in rows})
    ms = sorted({r["m"] for r in rows})
    assert all([m for m, _ in line[graph]] == ms for line in pts.values())
    assert all(math.isfinite(s) and s > 0 for line in pts.values() for _, s in line[graph])
    with pytest.raises(ValueError, match="not a 2:4 benchmark result"):
        plots.sparse24_points(_report())


@needs_mpl
def test_sparse24_figure_one_panel_per_shape_one_line_per_dtype(tmp_path):
    import matplotlib.pyplot as plt

    fig = plots.sparse24_figure(_harness_result())
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == ["64 × 128 (out × in)", "128 × 64 (out × in)"]
    lines = {ln.get_label(): ln for ln in panels[0].get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {f"{d}, {k}" for d in ("float16", "bfloat16") for k, *_ in plots.SPEEDUPS}
    g16 = lines["float16, CUDA graph, vs F.linear"]
    assert list(g16.get_xdata()) == [1, 16, 256] and list(g16.get_ydata()) == pytest.approx([1.001, 1.016, 1.256])
    assert panels[0].get_xscale() == "log" and "Test GPU" in fig.get_suptitle()
    plt.close(fig)
    out = plots.plot_sparse24(ROOT / "benchmarks" / "results" / "sparse24.json", tmp_path / "speedup.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size < 200_000


@needs_mpl
def test_module_cli(tmp_path, capsys):
    bench = ROOT / "benchmarks" / "results" / "sparse24.json"
    assert plots.main(["bench", str(bench), "-o", str(tmp_path / "b.png")]) == 0
    rep = tmp_path / "r.json"
    rep.write_text(json.dumps(_report()))
    assert plots.main(["report", str(rep), "-o", str(tmp_path / "r.png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "b.png"), str(tmp_path / "r.png")]
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG and (tmp_path / "r.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------- llmprune
@pytest.fixture
def tiny_dir(cli_model_dir):
    return cli_model_dir


def _args(root, *extra):
    return [str(root / "model"), "--text", str(root / "text.txt"), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "-q", *extra]


@needs_mpl
def test_prune_plot_and_plot_command(tiny_dir, tmp_path, capsys):
    pic, rep = tmp_path / "layers.png", tmp_path / "report.json"
    assert main(["prune", *_args(tiny_dir, "--method", "sparsegpt", "--sparsity", "0.5", "--report", str(rep),
                                 "--plot", str(pic))]) == 0
    assert f"plot:             {pic}" in capsys.readouterr().out
    assert pic.read_bytes()[:8] == PNG
    # llmprune plot: the same picture from the saved report (default name beside it), or any -o path
    assert main(["plot", str(rep)]) == 0 and (tmp_path / "report.png").read_bytes()[:8] == PNG
    assert main(["plot", str(rep), "-o", str(tmp_path / "again.pdf")]) == 0
    assert (tmp_path / "again.pdf").read_bytes()[:4] == b"%PDF"
    bench = ROOT / "benchmarks" / "results" / "sparse24.json"
    assert main(["plot", str(bench), "-o", str(tmp_path / "bench.png")]) == 0  # a benchmark result too
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG


def test_plot_problems_fail_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    import llmprune_kernels.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the --plot check"))
    cases = [(["--plot", str(tmp_path / "x.gif")], r"suffix '.gif'; allowed: .png, .pdf, .svg"),
             (["--plot", str(tmp_path / "x.png"), "--report", str(tmp_path / "x.png")],
              r"--plot .* is also the --report path")]
    for extra, pattern in cases:
        assert main(["prune", *_args(tiny_dir, *extra)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llmprune: error: ") and len(err.splitlines()) == 1 and re.search(pattern, err), err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["prune", *_args(tiny_dir, "--plot", str(tmp_path / "x.png"))]) == 2
    assert "pip install 'llmprune_kernels[plot]'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "missing.json' does not exist" in capsys.readouterr().err


@needs_mpl
def test_plot_of_an_eval_report_is_one_clear_line(tmp_path, capsys):
    rep = tmp_path / "eval.json"
    rep.write_text(json.dumps({k: v for k, v in copy.deepcopy(_report()).items() if k != "linears"}))
    assert main(["plot", str(rep), "-o", str(tmp_path / "x.png")]) == 2
    assert "no per-Linear results" in capsys.readouterr().err
