"""Pictures of results: a pruning run's JSON report, and the 2:4 benchmark's speed-up against M.

* :func:`plot_report`: per Linear, in model order, grouped by decoder layer: its sparsity, its relative
  reconstruction error and the time of its prune step, with each layer's total time beside them
  (``llmprune prune --plot FILE.png``, ``llmprune plot REPORT.json``);
* :func:`plot_sparse24`: ``SparseLinear`` over dense ``F.linear`` against M, one panel per weight shape, one
  line per dtype, from ``benchmarks/results/sparse24.json``
  (``python -m llmprune_kernels.plots bench benchmarks/results/sparse24.json -o docs/sparse24_speedup.png``).

matplotlib is optional (``pip install 'llmprune_kernels[plot]'``) and imported only here, with the Agg backend
(files, no display). Figures are written atomically; the format follows the file's suffix (png, pdf, svg).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmprune_kernels.atomic import atomic_file, check_target

FORMATS = ("png", "pdf", "svg")
_INSTALL = "pip install 'llmprune_kernels[plot]' (or pip install matplotlib)"
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")  # the first integer component of an fqn: the decoder layer


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"drawing a picture needs matplotlib, which is not installed; {_INSTALL}") from None
    matplotlib.use("Agg")  # files only: no display, and the same pixels on every machine
    import matplotlib.pyplot as plt

    return plt


def check_output(path: str | Path) -> Path:
    """The checked picture path: matplotlib importable, a known suffix, a writable file (before any work)."""
    target = Path(path).expanduser()
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"picture {str(path)!r} has suffix {target.suffix or '(none)'!r}; allowed: "
                         + ", ".join(f".{f}" for f in FORMATS))
    _pyplot()
    return check_target(target, overwrite=True, kind="file")


def _save(fig, path: str | Path) -> Path:
    target = check_output(path)
    try:
        with atomic_file(target, overwrite=True) as tmp:  # never a half-written picture
            fig.savefig(tmp, format=target.suffix.lower().lstrip("."), dpi=100)
    finally:
        _pyplot().close(fig)
    return target


def load_json(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not a report (an object)")
    return data


def _num(v: Any) -> float | None:
    """A finite float, else None (reports write NaN / inf as strings, missing values as null)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------------------------- the report
def _layers(names: Sequence[str]) -> list[int | None]:
    return [int(m.group(1)) if (m := _LAYER.search(n)) else None for n in names]


def plot_report(report: dict[str, Any] | str | Path, path: str | Path) -> Path:
    """Draw a pruning report (``build_report``'s dict, or its JSON file) into ``path``; returns the path."""
    check_output(path)
    return _save(report_figure(report if isinstance(report, dict) else load_json(report)), path)


def report_figure(report: dict[str, Any]):
    """The report's matplotlib Figure: axes 0-2 hold one bar per Linear (sparsity, rel. error, time), in
    ``report["linears"]`` order; a twin axis of axes 2 holds one line per decoder layer (its time)."""
    linears = report.get("linears")
    if not linears:
        raise ValueError("the report holds no per-Linear results (report['linears']); an 'llmprune prune' report "
                         "has them ('llmprune eval' reports do not)")
    plt = _pyplot()
    names = [str(s.get("name", i)) for i, s in enumerate(linears)]
    kinds = [n.rsplit(".", 1)[-1] for n in names]  # q_proj, ..., down_proj: one colour each
    palette = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(dict.fromkeys(kinds))}
    colors = [palette[k] for k in kinds]
    x = list(range(len(linears)))
    layers = _layers(names)

    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True, constrained_layout=True)
    panels = [("sparsity", "sparsity"), ("rel_error", "rel. reconstruction error\n‖(W − W′)X‖ / ‖WX‖"),
              ("time_s", "prune time per Linear (s)")]
    for ax, (key, label) in zip(axes, panels):
        ys = [_num(s.get(key)) for s in linears]
        ax.bar([i for i, y in zip(x, ys) if y is not None], [y for y in ys if y is not None], width=0.85,
               color=[c for c, y in zip(colors, ys) if y is not None])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if all(y is None for y in ys):
            ax.text(0.5, 0.5, f"no {key} in this report" + (" (run without --no-error)" if key == "rel_error" else ""),
                    transform=ax.transAxes, ha="center", va="center", color="gray")
    axes[0].set_ylim(0, 1)
    handles, labels = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()], list(palette)
    target = _num((report.get("sparsity") or {}).get("sparsity"))
    if target:
        handles.append(axes[0].axhline(target, color="black", lw=0.8, ls="--"))
        labels.append(f"target sparsity {target:g}")
    axes[0].legend(handles, labels, ncol=min(len(labels), 8), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   fontsize=8, frameon=False)

    # layer boundaries and labels; each layer's own time (statistics, solve, checks: more than its Linears')
    spans: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        if layer is not None:
            spans.setdefault(layer, []).append(i)
    for ax in axes:
        for idx in list(spans.values())[1:]:
            ax.axvline(idx[0] - 0.5, color="gray", lw=0.4, alpha=0.5)
    layer_times = [_num(t) for t in report.get("layer_times_s") or []]
    if spans and any(t is not None for t in layer_times):
        twin = axes[2].twinx()
        for layer, idx in spans.items():
            t = layer_times[layer] if layer < len(layer_times) else None
            if t is not None:
                twin.hlines(t, idx[0] - 0.45, idx[-1] + 0.45, color="black", lw=1.5)
        twin.set_ylabel("layer time (s, black lines)")
        twin.set_ylim(0, 1.15 * max(t for t in layer_times if t is not None) or 1)
    step = max(1, math.ceil(len(spans) / 30))  # at most ~30 layer labels
    ticks = [(sum(idx) / len(idx), str(layer)) for n, (layer, idx) in enumerate(spans.items()) if n % step == 0]
    if ticks:
        axes[2].set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=8)
        axes[2].set_xlabel("decoder layer (bars: its Linears in model order)")
    else:
        axes[2].set_xlabel("Linear (model order)")
    axes[2].set_xlim(-0.6, len(linears) - 0.4)

    fig.suptitle(_title(report, len(linears)), fontsize=11)
    footer = _footer(report)
    if footer:
        fig.supxlabel(footer, fontsize=8, color="dimgray")
    return fig


def _title(report: dict[str, Any], count: int) -> str:
    model = str(report.get("model") or "model")
    label = (report.get("sparsity") or {}).get("label")
    parts = [f"{Path(model).name or model}: {report.get('method') or '?'}" + (f" {label}" if label else "")]
    overall = _num(report.get("overall_sparsity"))
    parts.append(f"{count} Linears" + (f", overall sparsity {overall:.3f}" if overall is not None else ""))
    ppl = report.get("perplexity") or {}
    dense, pruned = _num(ppl.get("dense")), _num(ppl.get("pruned"))
    if dense is not None and pruned is not None:
        parts.append(f"perplexity {dense:.2f} → {pruned:.2f}")
    return " — ".join(parts)


def _footer(report: dict[str, Any]) -> str:
    stages = {k: _num(v) for k, v in (report.get("stage_times_s") or {}).items()}
    shown = [f"{k} {_secs(v)}" for k, v in stages.items() if v]
    host = report.get("host") or {}
    where = host.get("gpu") or (f"CPU, {host['torch_threads']} threads" if host.get("torch_threads") else None)
    total = _num((report.get("timings_s") or {}).get("prune"))
    line = (f"prune {_secs(total)}" if total is not None else "") + (f" ({', '.join(shown)})" if shown else "")
    return "; ".join(p for p in (line.strip(), where) if p)


def _secs(v: float) -> str:
    return f"{v:.0f} s" if v >= 100 else f"{v:.3g} s"


# ------------------------------------------------------------------------------------- the 2:4 benchmark
# (label, keys in the harness's figures[i]["ratios"], keys in older results' cases[i]); first present wins
SPEEDUPS = (
    ("CUDA graph, vs F.linear", ("speedup_dispatched_cold_graph",), ("speedup_graph",)),
    ("eager, vs nn.Linear call", ("speedup_dispatched_cold_eager_vs_nn_linear",), ("speedup_eager_vs_nn_linear",)),
)


def sparse24_points(results: dict[str, Any]) -> dict[tuple[tuple[int, int], str], dict[str, list[tuple[int, float]]]]:
    """{(shape, dtype): {speed-up label: [(M, speed-up), ...] sorted by M}} from a sparse24 result."""
    rows = results.get("figures") or results.get("cases")
    if results.get("suite") != "sparse24" or not rows:
        raise ValueError(f"not a 2:4 benchmark result (suite {results.get('suite')!r}, no figures); allowed: "
                         f"benchmarks/results/sparse24.json as bench_sparse24.py writes it")
    out: dict = {}
    for r in rows:
        ratios = r.get("ratios") or {}
        key = (tuple(r["shape"]), str(r["dtype"]))
        for label, new, old in SPEEDUPS:
            v = next((_num(ratios.get(k)) for k in new if _num(ratios.get(k)) is not None), None)
            if v is None:
                v = next((_num(r.get(k)) for k in old if _num(r.get(k)) is not None), None)
            if v is not None:
                out.setdefault(key, {}).setdefault(label, []).append((int(r["m"]), v))
    for lines in out.values():
        for pts in lines.values():
            pts.sort()
    if not out:
        raise ValueError("the 2:4 benchmark result holds no speed-up figures")
    return out


def plot_sparse24(results: dict[str, Any] | str | Path, path: str | Path) -> Path:
    """Draw the 2:4 benchmark (its result dict or JSON file) into ``path``: speed-up against M per shape/dtype."""
    check_output(path)
    return _save(sparse24_figure(results if isinstance(results, dict) else load_json(results)), path)


def sparse24_figure(results: dict[str, Any]):
    """The benchmark's Figure: one panel per weight shape, one line per (dtype, speed-up kind) over M."""
    points = sparse24_points(results)
    plt = _pyplot()
    shapes = list(dict.fromkeys(s for s, _ in points))
    dtypes = list(dict.fromkeys(d for _, d in points))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4), sharey=True, squeeze=False,
                             constrained_layout=True)
    styles = {label: ls for (label, *_), ls in zip(SPEEDUPS, ("-", "--"))}
    for ax, shape in zip(axes[0], shapes):
        for j, dtype in enumerate(dtypes):
            for label, pts in points.get((shape, dtype), {}).items():
                ax.plot([m for m, _ in pts], [s for _, s in pts], styles[label], marker="o", ms=4,
                        color=plt.get_cmap("tab10")(j), label=f"{dtype}, {label}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ms = sorted({m for lines in points.values() for pts in lines.values() for m, _ in pts})
        ax.set_xticks(ms, [str(m) for m in ms], fontsize=8)
        ax.minorticks_off()
        ax.set_title(f"{shape[0]} × {shape[1]} (out × in)", fontsize=10)
        ax.set_xlabel("M (rows of input)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over dense (×)")
    legend = {lab: h for ax in axes[0] for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), ncol=min(len(legend), 4), loc="outside lower center", fontsize=8,
               frameon=False)
    env = results.get("env") or {}
    where = ", ".join(str(env[k]) for k in ("gpu", "torch") if env.get(k))
    fig.suptitle("2:4 SparseLinear over dense" + (f" — {where}" if where else ""), fontsize=11)
    return fig


def plot_file(source: str | Path, path: str | Path | None = None) -> Path:
    """Draw a pruning report or a 2:4 benchmark result, whichever ``source`` holds (default: SOURCE.png)."""
    data = load_json(source)
    out = path if path is not None else Path(source).expanduser().with_suffix(".png")
    return plot_sparse24(data, out) if data.get("suite") == "sparse24" else plot_report(data, out)


# ----------------------------------------------------------------------------------------------- the CLIs
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """``llmprune prune --plot FILE``."""
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw per-Linear sparsity, reconstruction error and time into this picture (.png, .pdf, "
                        f".svg; needs matplotlib: {_INSTALL})")


def check_cli(args) -> None:
    """Fail before loading the model when ``--plot`` cannot be drawn or written."""
    if getattr(args, "plot", None):
        args.plot = str(check_output(args.plot))
        for flag in ("report", "output"):
            other = getattr(args, flag, None)
            if other and Path(other).expanduser().resolve() == Path(args.plot).resolve():
                raise ValueError(f"--plot {args.plot!r} is also the --{flag} path; give the picture its own file")


def cli_save(args, report: dict[str, Any]) -> None:
    if getattr(args, "plot", None):
        print(f"plot:             {plot_report(report, args.plot)}", flush=True)


def add_cli_command(sub, debug) -> None:
    """``llmprune plot REPORT.json [-o FILE.png]``."""
    p = sub.add_parser("plot", help="draw a --report JSON (or the 2:4 benchmark's JSON) as a picture",
                       description="Per-Linear sparsity, reconstruction error and time of a pruning report; for "
                                   "benchmarks/results/sparse24.json, the 2:4 speed-up against M per shape and dtype.")
    p.add_argument("source", metavar="REPORT.json", help="a pruning report (llmprune prune --report) or sparse24.json")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png",
                   help="picture to write (.png, .pdf, .svg; default: REPORT.png beside the JSON)")
    debug(p)
    p.set_defaults(func=_cmd_plot, quiet=True)


def _cmd_plot(args) -> int:
    print(plot_file(args.source, args.output))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmprune_kernels.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name, help_ in (("report", "a pruning report (llmprune prune --report FILE)"),
                        ("bench", "the 2:4 benchmark result (benchmarks/results/sparse24.json)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("source", metavar="JSON")
        p.add_argument("-o", "--output", required=True, metavar="FILE.png")
    args = parser.parse_args(argv)
    draw = plot_report if args.what == "report" else plot_sparse24
    print(draw(args.source, args.output))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
