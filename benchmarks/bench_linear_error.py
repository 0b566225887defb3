"""Per-Linear reconstruction error of ADMM against SparseGPT on SmolLM2-135M (the embedded GGUF), same W and H.

Every Linear of every decoder layer gets its input Hessian ``H = (2/n) sum x x^T`` in fp32 from the dense
model's forward pass over the calibration windows (64 x 512 tokens, seed 0: those of ``bench_quality.py``),
accumulated by the package's own statistics (``pipeline.statistics.LayerStatistics``: SparseGPT's spec, q/k/v
and gate/up sharing one accumulator, n = sequences as in SparseGPT). Then on the same (W, H), per pattern
(50%, 2:4, 70%):

* ``sparsegpt``: ``ops.sparsegpt_prune`` with its defaults (backend ``auto``: the extension where built for the
  device; on CUDA its fp64 one-factorisation inverse);
* ``admm``: ``methods.admm.admm_prune`` with its defaults (or ``--admm-option key=value``);

and the relative reconstruction error ``sqrt(tr(E H E^T) / tr(W H W^T))``, ``E = W - W_pruned``, in fp64 on the
undamped H, with each call's wall-clock seconds (device synchronised; for orientation, the GPU suites time
against baselines). Inputs are dense for every Linear (no pruned layer feeds the next), so both methods
solve the same problems, with one difference in the unstructured constraint: SparseGPT prunes its share of each
128-column block over all rows (a row's sparsity may differ from the target), ADMM's default (``scope="matrix"``)
of the whole matrix (``--admm-option scope=row``: exactly its share of every row).

A suite (``pytest benchmarks/bench_linear_error.py``: the canonical settings, on CUDA; on a CPU only with
``LLMPRUNE_BENCH_LINEAR_ERROR_CPU=1``, as it takes hours on a few cores: on two shared cores the statistics took
14 minutes and each decoder layer about 3) and a script:

    python benchmarks/bench_linear_error.py [--device cpu] [--nsamples 64] [--seqlen 512] [--patterns 50%,2:4,70%]
        [--linears NAME,...] [--admm-option iterations=40] [--out benchmarks/results/linear_error_smollm2]

Writes ``<out>.json`` (per Linear and pattern both errors, their ratio and seconds; a summary per pattern: how
many Linears ADMM leaves below SparseGPT, the worst and mean ratio ADMM / SparseGPT, the Linears where ADMM is
not below; settings, versions, host, date) and ``<out>.md``, both rewritten after every decoder layer.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from llmprune_kernels import SparsityConfig
from llmprune_kernels.methods import check_options
from llmprune_kernels.methods.admm import ADMMPruner, admm_prune
from llmprune_kernels.methods.sparsegpt import SparseGPTPruner
from llmprune_kernels.ops import sparsegpt as sgpt_ops
from llmprune_kernels.pipeline import data as D
from llmprune_kernels.pipeline.models import (decoder_layers_parent, find_decoder_layers, load_model,
                                              model_display_name, prunable_modules)
from llmprune_kernels.pipeline.report import host, versions, write_json
from llmprune_kernels.pipeline.statistics import LayerStatistics

RESULTS_DIR = Path(os.environ.get("LLMPRUNE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
DEFAULT_OUT = RESULTS_DIR / "linear_error_smollm2"
CANONICAL_ARGS = ["--nsamples", "64", "--seqlen", "512", "-q"]
PATTERNS = {"50%": SparsityConfig(0.5), "2:4": SparsityConfig(n=2, m=4), "70%": SparsityConfig(0.7)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def collect_hessians(model, calib: torch.Tensor, device: torch.device, batch_size: int = 4) -> dict:
    """``{linear name: (nn.Linear, H)}`` for every prunable Linear of every decoder layer, from one dense forward
    pass of the calibration windows with each layer's ``LayerStatistics`` hooks in place (shared H tensors for
    Linears reading the same input)."""
    path, layers = find_decoder_layers(model)
    feeds, handles = [], []
    for i, layer in enumerate(layers):
        pruners = {m: SparseGPTPruner(m, SparsityConfig(0.5), layer_name=f"{path}.{i}.{name}")
                   for name, m in prunable_modules(layer).items()}
        feed = LayerStatistics(pruners)
        handles += [mod.register_forward_hook(hook) for mod, hook in feed.hooks(layer).items()]
        feeds.append((feed, pruners))
    base = decoder_layers_parent(model)
    try:
        for b in range(0, calib.shape[0], batch_size):
            base(input_ids=calib[b:b + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for feed, pruners in feeds:
        feed.deliver()
        for m, p in pruners.items():
            out[p.layer_name] = (m, p.finalized_statistic())
    return out


def rel_error(W: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """``sqrt(tr(E H E^T) / tr(W H W^T))``, ``E = W - pruned``, in fp64."""
    W64, H64 = W.double(), H.double()
    E = W64 - pruned.double()
    num, den = float(((E @ H64) * E).sum()), float(((W64 @ H64) * W64).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def compare_linear(W: torch.Tensor, H: torch.Tensor, config: SparsityConfig, admm_options, name: str) -> dict:
    """Both methods on one (W, H, pattern): errors, ratio ADMM / SparseGPT, seconds, SparseGPT's backend."""
    dev = W.device
    _sync(dev)
    t0 = time.perf_counter()
    sg, used = sgpt_ops.sparsegpt_prune(W, H, config, name=name)
    _sync(dev)
    t1 = time.perf_counter()
    ad = admm_prune(W, H, config, admm_options, name=name)
    _sync(dev)
    t2 = time.perf_counter()
    e_sg, e_ad = rel_error(W, sg.weight, H), rel_error(W, ad.weight, H)
    return {"sparsegpt": e_sg, "admm": e_ad, "ratio": e_ad / e_sg if e_sg > 0 else None,
            "sparsegpt_s": round(t1 - t0, 4), "admm_s": round(t2 - t1, 4), "sparsegpt_backend": used,
            "admm_damp_retries": ad.retries, "sparsegpt_damp_retries": sg.retries}


def summarise(linears: list[dict]) -> dict:
    """Per pattern: how many Linears ADMM leaves below SparseGPT, worst / mean / median ratio, total seconds,
    and the Linears where ADMM is not below (with their ratio)."""
    out = {}
    for pattern in PATTERNS:
        rows = [(r["name"], r["patterns"][pattern]) for r in linears if pattern in r["patterns"]]
        if not rows:
            continue
        ratios = [(p["ratio"], n) for n, p in rows if p["ratio"] is not None]
        worst = max(ratios) if ratios else (None, None)
        out[pattern] = {
            "linears": len(rows),
            "admm_below": sum(p["admm"] < p["sparsegpt"] for _, p in rows),
            "worst_ratio": worst[0], "worst_linear": worst[1],
            "mean_ratio": statistics.fmean(r for r, _ in ratios) if ratios else None,
            "median_ratio": statistics.median(r for r, _ in ratios) if ratios else None,
            "best_ratio": min(ratios)[0] if ratios else None,
            "sparsegpt_seconds": round(sum(p["sparsegpt_s"] for _, p in rows), 2),
            "admm_seconds": round(sum(p["admm_s"] for _, p in rows), 2),
            "admm_not_below": [{"linear": n, "ratio": p["ratio"]} for n, p in rows
                               if not p["admm"] < p["sparsegpt"]],
        }
    return out


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [
        f"# Per-Linear reconstruction error, ADMM vs SparseGPT, {result['model']}",
        "",
        f"Relative error sqrt(tr(E H E^T) / tr(W H W^T)) on each Linear's dense-input Hessian; calibration "
        f"{s['nsamples']} x {s['seqlen']} tokens (seed {s['seed']}, {result['text_source']}); device {s['device']}; "
        f"SparseGPT defaults (backend {result.get('sparsegpt_backend')}), ADMM options "
        f"{result['admm_options']}; {result['date']}.",
        "",
        "| pattern | Linears | ADMM below | worst ratio | mean ratio | median ratio | SparseGPT s | ADMM s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pattern, m in result["summary"].items():
        lines.append(f"| {pattern} | {m['linears']} | {m['admm_below']} | {m['worst_ratio']:.4f} | "
                     f"{m['mean_ratio']:.4f} | {m['median_ratio']:.4f} | {m['sparsegpt_seconds']:.1f} | "
                     f"{m['admm_seconds']:.1f} |")
    lines += ["", "Ratio = ADMM error / SparseGPT error (below 1: ADMM reconstructs better).", "",
              "| Linear | shape | " + " | ".join(f"{p} SparseGPT | {p} ADMM | {p} ratio" for p in PATTERNS) + " |",
              "|---|---|" + "---:|" * (3 * len(PATTERNS))]
    for r in result["linears"]:
        cells = []
        for p in PATTERNS:
            v = r["patterns"].get(p)
            cells += ([f"{v['sparsegpt']:.4f}", f"{v['admm']:.4f}", f"{v['ratio']:.3f}"] if v else ["", "", ""])
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated, of {', '.join(PATTERNS)}".replace("%", "%%"))
    ap.add_argument("--linears", default=None, help="comma-separated Linear names (default: all)")
    ap.add_argument("--admm-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an ADMM option (repeatable), e.g. iterations=40")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    if unknown := [p for p in patterns if p not in PATTERNS]:
        ap.error(f"unknown pattern(s) {unknown}; allowed: {', '.join(PATTERNS)}")
    overrides = dict(kv.split("=", 1) for kv in args.admm_option)
    admm_options = check_options(ADMMPruner, {k: _option_value(v) for k, v in overrides.items()})
    device = torch.device(args.device)
    out = Path(args.out)
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=device)  # fp32: the GGUF dequantises to it
    text = D.load_text(None, None)
    calib = D.calibration_windows(D.tokenize(tok, text.calibration, "calibration text"), args.nsamples, args.seqlen,
                                  args.seed)
    t0 = time.perf_counter()
    hessians = collect_hessians(model, calib, device, args.batch_size)
    t_stats = time.perf_counter() - t0
    wanted = set(args.linears.split(",")) if args.linears else None
    if wanted and (missing := wanted - set(hessians)):
        ap.error(f"unknown Linear(s) {sorted(missing)}; e.g. {next(iter(hessians))}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import env_info

    result = {
        "model": model_display_name(args.model), "text_source": text.source,
        "settings": {"model": args.model, "device": str(device), "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "seed": args.seed, "batch_size": args.batch_size, "patterns": patterns,
                     "linears": sorted(wanted) if wanted else "all"},
        "admm_options": dataclasses.asdict(admm_options),
        "sparsegpt_backend": sgpt_ops.resolve_backend("auto", device),
        "sparsegpt_fast_inverse": sgpt_ops.resolve_fast_inverse(None, sgpt_ops.resolve_backend("auto", device),
                                                                device),
        "statistics_seconds": round(t_stats, 2),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "host": host(), "env": env_info(), "linears": [], "summary": {},
    }
    names = [n for n in hessians if wanted is None or n in wanted]
    for k, name in enumerate(names):
        module, H = hessians[name]
        W = module.weight.detach()
        row = {"name": name, "shape": list(W.shape), "patterns": {}}
        for p in patterns:
            row["patterns"][p] = compare_linear(W, H, PATTERNS[p], admm_options, name)
        result["linears"].append(row)
        if not args.quiet:
            print(f"{name} {tuple(W.shape)}: " + ", ".join(
                f"{p} {v['sparsegpt']:.4f} -> {v['admm']:.4f}" for p, v in row["patterns"].items()), flush=True)
        if k + 1 == len(names) or names[k + 1].rsplit(".", 2)[0] != name.rsplit(".", 2)[0]:
            result["summary"] = summarise(result["linears"])  # after every decoder layer: a cut run keeps its rows
            write_json(result, out.with_suffix(".json"))
            write_markdown(result, out.with_suffix(".md"))
    result["summary"] = summarise(result["linears"])
    write_json(result, out.with_suffix(".json"))
    write_markdown(result, out.with_suffix(".md"))
    for p, m in result["summary"].items():
        print(f"{p}: ADMM below SparseGPT on {m['admm_below']}/{m['linears']} Linears; ratio worst "
              f"{m['worst_ratio']:.4f} ({m['worst_linear']}), mean {m['mean_ratio']:.4f}; seconds SparseGPT "
              f"{m['sparsegpt_seconds']:.1f}, ADMM {m['admm_seconds']:.1f}", flush=True)
    return 0


def test_linear_error(benchmark):
    """The canonical comparison (``CANONICAL_ARGS``) on every Linear, on CUDA when there is a GPU."""
    if not torch.cuda.is_available() and os.environ.get("LLMPRUNE_BENCH_LINEAR_ERROR_CPU") != "1":
        pytest.skip("hours on a CPU: set LLMPRUNE_BENCH_LINEAR_ERROR_CPU=1, or run the script with --linears")
    try:
        from llmprune_kernels.pipeline.models import resolve_model_source

        resolve_model_source(None)
    except Exception as exc:  # noqa: BLE001 - the embedded model's package is optional
        pytest.skip(f"the embedded SmolLM2 model is not available: {exc}")
    rc = benchmark.pedantic(main, args=(CANONICAL_ARGS,), rounds=1, iterations=1)
    result = json.loads(DEFAULT_OUT.with_suffix(".json").read_text())
    benchmark.extra_info.update({p: {k: v for k, v in m.items() if k != "admm_not_below"}
                                 for p, m in result["summary"].items()})
    assert rc == 0 and all(len(r["patterns"]) == len(PATTERNS) for r in result["linears"])


if __name__ == "__main__":
    sys.exit(main())
