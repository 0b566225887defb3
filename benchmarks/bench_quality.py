"""Quality table: held-out perplexity of SmolLM2-135M (the embedded GGUF) pruned by every method.

A suite (``pytest benchmarks/bench_quality.py``: the canonical settings below, on CUDA; on a CPU only with
``LLMPRUNE_BENCH_QUALITY_CPU=1``, as it takes hours on a few cores) and a plain script for any setting:

    python benchmarks/bench_quality.py [--device cpu] [--nsamples 64] [--seqlen 512] [--eval-windows 0]
                                       [--only wanda-50,owl-wanda-70] [--out benchmarks/results/quality_smollm2]

Rows: dense; magnitude, Wanda, SparseGPT, GBLM at 50% and 2:4; SparseGPT, SparseLLM, Wanda, OWL+Wanda,
OWL+SparseGPT at 70%; ADMM, Wanda+DSnoT, SparseGPT+DSnoT at 50%, 2:4 and 70%; ADMM+DSnoT at 2:4 and 70%;
OWL+ADMM at 70%. A ``METHOD+dsnot`` row takes the method's options (e.g. SparseGPT's ``backend``) and DSnoT's
defaults. Every row starts from the same dense model, the same calibration windows (seeded)
and the same held-out windows. Writes ``<out>.json`` (all numbers, options, versions, host, date) and
``<out>.md`` (the table). Rows already present in ``<out>.json`` with the same settings are kept unless
``--redo`` (so an interrupted run resumes). Perplexity is the figure here; the prune times are the wall
clock of each row's ``prune_model`` call, for orientation (speed is measured against baselines by the other
suites).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from llmprune_kernels import SparsityConfig
from llmprune_kernels.pipeline import data as D
from llmprune_kernels.pipeline.evaluate import perplexity
from llmprune_kernels.pipeline.models import load_model, model_display_name
from llmprune_kernels.pipeline import prune_model
from llmprune_kernels.pipeline.report import host, versions, write_json

RESULTS_DIR = Path(os.environ.get("LLMPRUNE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
DEFAULT_OUT = RESULTS_DIR / "quality_smollm2"
# The settings of the canonical table (results/quality_smollm2.*): every held-out window
CANONICAL_ARGS = ["--nsamples", "64", "--seqlen", "512", "--eval-windows", "0", "--redo", "-q"]

# (key, method, sparsity or "N:M", owl)
ROWS = [
    ("magnitude-50", "magnitude", 0.5, False),
    ("wanda-50", "wanda", 0.5, False),
    ("sparsegpt-50", "sparsegpt", 0.5, False),
    ("gblm-50", "gblm", 0.5, False),
    ("magnitude-2:4", "magnitude", "2:4", False),
    ("wanda-2:4", "wanda", "2:4", False),
    ("sparsegpt-2:4", "sparsegpt", "2:4", False),
    ("gblm-2:4", "gblm", "2:4", False),
    ("sparsegpt-70", "sparsegpt", 0.7, False),
    ("sparsellm-70", "sparsellm", 0.7, False),
    ("wanda-70", "wanda", 0.7, False),
    ("owl-wanda-70", "wanda", 0.7, True),
    ("owl-sparsegpt-70", "sparsegpt", 0.7, True),
    ("admm-50", "admm", 0.5, False),
    ("admm-2:4", "admm", "2:4", False),
    ("admm-70", "admm", 0.7, False),
    ("wanda+dsnot-50", "wanda+dsnot", 0.5, False),
    ("wanda+dsnot-2:4", "wanda+dsnot", "2:4", False),
    ("wanda+dsnot-70", "wanda+dsnot", 0.7, False),
    ("sparsegpt+dsnot-50", "sparsegpt+dsnot", 0.5, False),
    ("sparsegpt+dsnot-2:4", "sparsegpt+dsnot", "2:4", False),
    ("sparsegpt+dsnot-70", "sparsegpt+dsnot", 0.7, False),
    ("admm+dsnot-2:4", "admm+dsnot", "2:4", False),
    ("admm+dsnot-70", "admm+dsnot", 0.7, False),
    ("owl-admm-70", "admm", 0.7, True),
]


def _config(s) -> SparsityConfig:
    return SparsityConfig.parse(pattern=s) if isinstance(s, str) else SparsityConfig(s)


def run_row(dense_model, calib, eval_ids, key, method, sparsity, owl, args) -> dict:
    from llmprune_kernels.pipeline.owl import owl_layer_sparsity

    model = copy.deepcopy(dense_model)
    cfg = _config(sparsity)
    t0 = time.perf_counter()
    layer_sparsity, owl_report = None, None
    if owl:
        layer_sparsity, owl_report = owl_layer_sparsity(model, calib, cfg.sparsity, args.owl_m, args.owl_lambda,
                                                        device=args.device, batch_size=args.batch_size)
    options = {}
    base = method.partition("+")[0]  # "sparsegpt+dsnot": the refined method takes SparseGPT's options too
    if base in ("sparsegpt", "sparsellm"):
        options["backend"] = args.sparsegpt_backend
    if base == "sparsellm":
        options["iterations"] = args.sparsellm_iterations
        options["local"] = args.sparsellm_local
    res = prune_model(model, calib, method, cfg, device=args.device, batch_size=args.batch_size,
                      layer_sparsity=layer_sparsity, options=options, measure_error=False, progress=not args.quiet)
    t_prune = time.perf_counter() - t0
    ppl = perplexity(model, eval_ids, device=args.device, batch_size=args.batch_size)
    row = {"key": key, "method": method, "sparsity": cfg.label, "owl": owl, "perplexity": ppl,
           "overall_sparsity": res.overall_sparsity, "prune_seconds": round(t_prune, 2), "options": res.options}
    if owl_report:
        row.update(owl_report)
    extra = getattr(res, "method_report", None)
    if extra:
        row["method_report"] = extra
    del model
    return row


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [
        f"# Held-out perplexity, {result['model']}",
        "",
        f"Calibration {s['nsamples']} x {s['seqlen']} tokens (seed {s['seed']}), evaluation "
        f"{result['eval_windows']} x {s['seqlen']} held-out tokens ({result['text_source']}); device "
        f"{s['device']}; {result['date']}.",
        "",
        "| method | sparsity | perplexity | overall sparsity | prune wall time (s) |",
        "|---|---|---:|---:|---:|",
        f"| dense | 0 | {result['dense_perplexity']:.3f} | 0 | - |",
    ]
    for key, *_ in ROWS:
        r = result["rows"].get(key)
        if r is None:
            continue
        name = ("OWL+" if r["owl"] else "") + r["method"]
        lines.append(f"| {name} | {r['sparsity']} | {r['perplexity']:.3f} | {r['overall_sparsity']:.4f} | "
                     f"{r['prune_seconds']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows; 0 = all")
    ap.add_argument("--sparsegpt-backend", default="auto", help="SparseGPT backend: auto, reference or ext")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--sparsellm-iterations", type=int, default=4)
    ap.add_argument("--sparsellm-local", default="sparsegpt", help="SparseLLM's local pruner: sparsegpt or wanda")
    ap.add_argument("--only", default=None, help="comma-separated row keys (default: all)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in (
        "model", "device", "nsamples", "seqlen", "eval_windows", "seed", "owl_m", "owl_lambda", "sparsellm_iterations",
        "sparsellm_local", "sparsegpt_backend")}
    model, tok = load_model(args.model)
    text = D.load_text(None, None)
    calib = D.calibration_windows(D.tokenize(tok, text.calibration, "calibration text"), args.nsamples, args.seqlen,
                                  args.seed)
    eval_ids = D.eval_windows(D.tokenize(tok, text.evaluation, "evaluation text"), args.seqlen,
                             args.eval_windows or None)
    old = {}
    jpath = out.with_suffix(".json")
    if jpath.exists() and not args.redo:
        prev = json.loads(jpath.read_text())
        if prev.get("settings") == settings:
            old = prev.get("rows", {})
    result = {
        "model": model_display_name(args.model), "settings": settings, "text_source": text.source,
        "eval_windows": int(eval_ids.shape[0]), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "host": host(), "rows": dict(old),
    }
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import env_info

    result["env"] = env_info()
    result["dense_perplexity"] = perplexity(model, eval_ids, device=args.device, batch_size=args.batch_size)
    print(f"dense: {result['dense_perplexity']:.3f}", flush=True)
    wanted = set(args.only.split(",")) if args.only else None
    for key, method, sparsity, owl in ROWS:
        if (wanted and key not in wanted) or key in result["rows"]:
            continue
        row = run_row(model, calib, eval_ids, key, method, sparsity, owl, args)
        result["rows"][key] = row
        print(f"{key}: ppl {row['perplexity']:.3f} (sparsity {row['overall_sparsity']:.4f}, "
              f"{row['prune_seconds']:.1f}s)", flush=True)
        write_json(result, jpath)  # after every row: an interrupted run keeps what it measured
        write_markdown(result, out.with_suffix(".md"))
    write_json(result, jpath)
    write_markdown(result, out.with_suffix(".md"))
    return 0


def test_quality_table(benchmark):
    """The canonical table: every row at the settings of ``CANONICAL_ARGS``, on CUDA when there is a GPU."""
    if not torch.cuda.is_available() and os.environ.get("LLMPRUNE_BENCH_QUALITY_CPU") != "1":
        pytest.skip("the full table takes hours on a CPU: set LLMPRUNE_BENCH_QUALITY_CPU=1, or run the script "
                    "with smaller settings")
    try:
        from llmprune_kernels.pipeline.models import resolve_model_source

        resolve_model_source(None)
    except Exception as exc:  # noqa: BLE001 - the embedded model's package is optional
        pytest.skip(f"the embedded SmolLM2 model is not available: {exc}")
    rc = benchmark.pedantic(main, args=(CANONICAL_ARGS,), rounds=1, iterations=1)
    result = json.loads(DEFAULT_OUT.with_suffix(".json").read_text())
    benchmark.extra_info.update({"dense_perplexity": result["dense_perplexity"],
                                 "perplexity": {k: r["perplexity"] for k, r in result["rows"].items()}})
    assert rc == 0 and len(result["rows"]) == len(ROWS)


if __name__ == "__main__":
    sys.exit(main())
