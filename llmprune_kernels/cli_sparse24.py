"""``llmprune prune --pattern 2:4 --sparse24-weights fp8|int8``: after pruning, the 2:4 Linears become 8-bit 2:4
``SparseLinear8`` modules (:mod:`llmprune_kernels.sparse24.quant8`: FP8 e4m3 or INT8 values, one scale per output
channel). The pruned perplexity is then the 8-bit model's, and ``--output`` writes a compressed checkpoint
(``model.sparse24.safetensors`` + config, tokenizer and report; ``load_compressed`` reads it) instead of a dense
``save_pretrained`` directory. Without the flag nothing is quantised. ``--sparse24-activations 8bit`` (opt-in, with
``--sparse24-weights``) also lets CUDA calls above M = 16 quantise the activations per token to the same 8-bit type
(cuSPARSELt 8-bit 2:4, backend ``cslt8``) where tuning measured that faster; on the CPU the evaluation keeps the
16-bit activations of the reference.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from llmprune_kernels.sparse24.quant8 import ACTIVATIONS
from llmprune_kernels.validation import SparsityConfig

CHOICES = ("fp8", "int8")
ACTIVATION_CHOICES = ACTIVATIONS


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse24-weights", choices=CHOICES, default=None, metavar="{fp8,int8}",
                   help="with --pattern 2:4: after pruning, store the 2:4 Linears' kept weights in 8 bits (fp8: e4m3, "
                        "GPUs of compute capability 8.9+ or the CPU; int8: any device) with per-channel scales, "
                        "evaluate that model, and write --output as a compressed 2:4 checkpoint (default: off)")
    p.add_argument("--sparse24-activations", choices=ACTIVATION_CHOICES, default="16bit", metavar="{16bit,8bit}",
                   help="with --sparse24-weights: 8bit lets CUDA calls of more than 16 tokens quantise the activations "
                        "per token to the same 8-bit type and run cuSPARSELt's 8-bit 2:4 GEMM where tuning measured "
                        "it faster (default: 16bit, activations stay in the model's dtype)")


def check_cli(args, config: SparsityConfig, device: torch.device) -> None:
    """Before any work: the flag needs a 2:4 pattern, an in-memory run, and FP8 on the device it runs on."""
    choice = getattr(args, "sparse24_weights", None)
    act = getattr(args, "sparse24_activations", "16bit")
    if act not in ACTIVATION_CHOICES:
        raise ValueError(f"--sparse24-activations {act!r} is not supported; allowed: {', '.join(ACTIVATION_CHOICES)}")
    if choice is None:
        if act != "16bit":
            raise ValueError(f"--sparse24-activations {act} quantises activations to the 8-bit weights' type; it needs "
                             f"--sparse24-weights fp8 or int8")
        return
    if choice not in CHOICES:
        raise ValueError(f"--sparse24-weights {choice!r} is not supported; allowed: {', '.join(CHOICES)}")
    quantize = dict(getattr(args, "option", None) or []).get("quantize", "none")
    if quantize not in ("none", choice):  # 8-bit values rounded for one grid, then re-rounded to another
        raise ValueError(f"--option quantize={quantize} rounds the weights for {quantize}, but --sparse24-weights is "
                         f"{choice}; allowed: the same 8-bit type in both, or quantize=none")
    if not (config.is_nm and (config.n, config.m) == (2, 4)):
        raise ValueError(f"--sparse24-weights {choice} stores 2:4 weights; it needs --pattern 2:4 (got {config.label})")
    if getattr(args, "stream", False):
        raise ValueError(f"--sparse24-weights {choice} swaps modules of a model held in memory; it does not work with "
                         f"--stream (prune with --stream, then load the output without it)")
    from llmprune_kernels.sparse24.quant8 import check_fp8_device, weight_dtype_of

    check_fp8_device(weight_dtype_of(choice), device)


def _is_24_linear(module: nn.Module, fqn: str) -> bool:
    from llmprune_kernels.sparse24.linear import _is_24

    return isinstance(module, nn.Linear) and _is_24(module.weight)


def swap(model: nn.Module, args) -> dict | None:
    """The flag's swap (``sparsify_`` with ``SemiSparseWeightConfig(weight_dtype=...)`` on every 2:4 Linear): a
    report entry, or None without the flag."""
    choice = getattr(args, "sparse24_weights", None)
    if choice is None:
        return None
    from llmprune_kernels.sparse24.linear8 import SparseLinear8
    from llmprune_kernels.sparse24.sparsify import SemiSparseWeightConfig, sparsify_

    act = getattr(args, "sparse24_activations", "16bit")
    t0 = time.perf_counter()
    sparsify_(model, SemiSparseWeightConfig(weight_dtype=choice, activations=act), _is_24_linear)
    mods = [m for m in model.modules() if isinstance(m, SparseLinear8)]
    if not mods:
        raise ValueError(f"--sparse24-weights {choice}: the pruned model has no 2:4 Linear to store in 8 bits")
    packed = sum(m.quantized().nbytes() for m in mods)
    dense = sum(m.out_features * m.in_features * 2 for m in mods)
    info = {"weight_dtype": choice, "group_size": None, "scale_dtype": "float32", "activations": act,
            "modules": len(mods), "packed_bytes": packed, "dense_fp16_bytes": dense, "seconds": time.perf_counter() - t0}
    print(f"2:4 weights:      {choice}, {len(mods)} SparseLinear8 modules, {packed / 2**20:.1f} MiB "
          f"({packed / dense:.3f} of dense fp16)" + (", 8-bit activations above M = 16 where faster"
                                                    if act == "8bit" else ""), flush=True)
    return info


def save(model: nn.Module, tokenizer, args, report: dict) -> None:
    """``--output`` of an 8-bit run: the compressed checkpoint with tokenizer and ``pruning_report.json``."""
    from llmprune_kernels.pipeline.report import REPORT_FILE
    from llmprune_kernels.sparse24.checkpoint import save_compressed

    save_compressed(model, args.output, overwrite=args.overwrite, tokenizer=tokenizer,
                    extra_json={REPORT_FILE: report})
