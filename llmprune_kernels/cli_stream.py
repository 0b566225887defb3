"""``llmprune prune --stream``: prune a local safetensors model directory one decoder layer at a time.

The model is never loaded whole (``pipeline.stream.prune_pretrained``): CPU memory holds the embeddings,
the head and a few layers, so a 70B model prunes on a machine with far less memory than its size. The
pruned layers go straight into ``--output``; perplexity is not measured here (that would load the whole
model): ``llmprune eval OUTPUT`` does it afterwards.
"""
from __future__ import annotations

import sys
import time

import torch

from llmprune_kernels.validation import SparsityConfig


def check_stream_args(args) -> None:
    """What ``--stream`` needs, checked before any work."""
    if not args.output:
        raise ValueError("--stream writes each pruned layer into the output at once; it needs --output DIR")
    if args.model is None or str(args.model).endswith(".gguf"):
        raise ValueError(f"--stream reads a local Hugging Face directory with safetensors weights, not "
                         f"{args.model or 'the embedded GGUF model'!r}; allowed: MODEL as such a directory")
    if getattr(args, "owl", False):
        raise ValueError("--owl needs the whole model's outlier ratios before pruning; it is not available "
                         "with --stream")


def prune_streamed(args, config: SparsityConfig, options, device: torch.device, t_start: float, windows):
    """Run the streamed job; ``windows``: the CLI's calibration windows builder (the same windows as an
    in-memory run). Returns (name, result, timings, data_info, report)."""
    from transformers import AutoTokenizer

    from llmprune_kernels.pipeline.models import NO_REMOTE_CODE, model_display_name
    from llmprune_kernels.pipeline.report import build_report
    from llmprune_kernels.pipeline.stream import prune_pretrained

    if args.evaluate and not args.quiet:
        print(f"llmprune: note: --stream does not measure perplexity (it would load the whole model); run "
              f"'llmprune eval {args.output}' afterwards", file=sys.stderr, flush=True)
    name = model_display_name(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model, **NO_REMOTE_CODE)
    calib, _, data_info = windows(args, tokenizer, args.nsamples, evaluate=False)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    timings: dict[str, float] = {}
    sparsity = {"sparsity": config.sparsity, "n": config.n, "m": config.m, "label": config.label}

    def report_of(result):
        timings["prune"] = result.total_time_s
        timings["total"] = time.perf_counter() - t_start
        return build_report(model=name, method=args.method, options=result.options, sparsity=sparsity,
                            data=data_info, prune_result=result, timings=dict(timings), output_dir=args.output)

    reports = {}
    result = prune_pretrained(args.model, args.output, calib, args.method, config, device=device,
                              batch_size=args.batch_size, options=options, measure_error=args.measure_error,
                              dtype=dtype, gpu_memory=args.gpu_memory, resume=args.resume,
                              overwrite=args.overwrite, progress=not args.quiet,
                              min_expert_tokens=args.min_expert_tokens,
                              extra_json=lambda r: {"pruning_report.json": reports.setdefault("r", report_of(r))})
    timings["total"] = time.perf_counter() - t_start
    return name, result, timings, data_info, reports.get("r") or report_of(result)
