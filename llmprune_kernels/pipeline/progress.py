"""What a long run shows and records: the per-layer progress bar and the time spent in each stage."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from llmprune_kernels.pipeline.memory import memory_in_use
from llmprune_kernels.validation import SparsityConfig

# prepare: the method's model-level pass (GBLM gradients); load: weights to the compute device (from disk
# when streaming); capture: the first layer's inputs; statistics: the forward pass feeding the pruners;
# solve: the pruners' prune() calls; recompute: the outputs with pruned weights (and the reconstruction
# error); check: the finite check and sparsity count of each pruned weight; write: output shards and
# resume checkpoints.
STAGES = ("prepare", "load", "capture", "statistics", "solve", "recompute", "check", "write")


class StageTimes:
    """Seconds per stage; ``with times("solve"): ...`` adds the block's time (device work included)."""

    def __init__(self, device: torch.device, initial: dict[str, float] | None = None) -> None:
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.add(initial or {})

    def add(self, seconds: dict[str, float]) -> None:
        """Add earlier seconds per stage (those of the processes a resumed run continues)."""
        for key, value in seconds.items():
            if key in self.seconds:
                self.seconds[key] += float(value)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.seconds:
            raise ValueError(f"stage {stage!r} is unknown; allowed: {', '.join(STAGES)}")
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[stage] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)


def layer_bar(iterable: Iterable, progress: bool, method: str, config: SparsityConfig, total: int | None = None,
              initial: int = 0):
    """A tqdm bar over decoder layers (ETA included), or ``iterable`` itself without ``progress``."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"pruning {method} {config.label}", unit="layer", total=total, initial=initial,
                dynamic_ncols=True)


def show_layer(bar, device: torch.device, rel_errors: list[float]) -> None:
    """The bar's postfix after a layer: memory in use and the layer's mean reconstruction error."""
    if not hasattr(bar, "set_postfix_str"):
        return
    text = memory_in_use(device)
    if rel_errors:
        text += f" err {sum(rel_errors) / len(rel_errors):.3f}"
    bar.set_postfix_str(text)
