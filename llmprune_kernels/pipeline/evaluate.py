"""Perplexity = exp(mean next-token NLL) over non-overlapping windows of held-out text.

Each window is scored on its own (no context carried across windows), as in the SparseGPT and Wanda
evaluation code; the mean runs over every predicted token (seqlen - 1 per window).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE, check_windows


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def nll_sum(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> tuple[float, int]:
    """(sum of next-token NLLs in nats, number of predicted tokens) of ``windows`` (n, seqlen).

    ``device``: where to run (default: where the model is). A model elsewhere is moved there for the
    evaluation and moved back afterwards.
    """
    check_windows(windows, model, "evaluation windows", min_seqlen=2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size} is invalid; allowed: an integer >= 1")
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    model.to(device)
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", dynamic_ncols=True)
    try:
        for batch in batches:
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            # fp32 log-softmax: fp16/bf16 logits lose ~1e-3 relative in the loss otherwise.
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += ids[:, 1:].numel()
            del logits
    finally:
        model.to(home)
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, **kwargs: Any) -> float:
    """exp(mean NLL) of ``model`` over ``windows``; keyword arguments as ``nll_sum``.

    ``inf`` when the mean NLL overflows exp; ``nan`` when it is NaN (the model produced NaN logits).
    """
    total, count = nll_sum(model, windows, **kwargs)
    mean = total / count
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 700 else math.inf


def timed_perplexity(model: nn.Module, windows: torch.Tensor, **kwargs: Any) -> tuple[float, float]:
    """``(perplexity, seconds)``."""
    t0 = time.perf_counter()
    ppl = perplexity(model, windows, **kwargs)
    return ppl, time.perf_counter() - t0
