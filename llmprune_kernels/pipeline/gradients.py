"""GBLM-Pruner gradients: per-weight l2 norm over calibration samples of the scaled causal-LM gradient.

Follows ``gradient_computation.py`` of the GBLM-Pruner reference code (Das et al. 2023):

* one calibration sequence at a time, ``loss = model(input_ids, labels=input_ids).loss`` (the mean
  next-token cross-entropy over the whole window), ``loss.backward()``;
* for every Linear weight of every decoder layer (and fused expert parameter):
  ``acc += (grad.float() * scale) ** 2`` in fp32 (``scale = 100``; the scaling happens after the cast, so it
  guards the fp16 *result*, not the fp16 backward pass);
* at the end ``G = sqrt(acc)`` stored in fp16 (the reference saves ``.to(float16)``). There is no
  division by the number of samples: G grows with sqrt(nsamples), as in the reference.

Memory: the reference keeps ``param.grad`` for the whole model plus an fp32 and an fp16 accumulator.
Here each weight's gradient is folded into its fp32 accumulator by a post-accumulate-grad hook the moment
autograd finishes it and is then dropped, and every other parameter (embeddings, norms, biases, lm_head)
has ``requires_grad`` off; so beside the model the only full-size buffer is the accumulator (one fp32
copy of the decoder Linear weights), plus the activations of one sequence's backward pass.

Mixture-of-experts layers: the fused 3-D expert parameters (``pipeline.experts``) get one accumulator each,
and expert ``e``'s matrix is entry ``e`` of it, named as the pipeline names the slice
(``<experts>.<e>.gate_up_proj`` / ``.down_proj``). Autograd gives that entry only the tokens the router sent
to expert ``e``; an expert that got none has G = 0, and the pipeline's expert rule prunes it by magnitude.
Routers are left out, as the pipeline never prunes them.

Differences to the reference, on purpose: the model runs in ``eval()`` mode (the reference calls
``train()``, which only matters for models with dropout such as OPT; eval keeps results deterministic),
and the l1 accumulator the reference also writes (unused by the GBLM score) is not kept.
"""
from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from llmprune_kernels.validation import check_finite

GBLM_SCALE = 100.0


@dataclass(eq=False)
class GradientNorms(Mapping):
    """Per-Linear gradient norms G (same shape as the weight) keyed by full module name.

    A read-only mapping name -> G (of ``norms``), so it can be passed as GBLM's ``gradients`` option.
    """

    norms: dict[str, torch.Tensor]
    nsamples: int
    scale: float
    losses: list[float] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.norms[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.norms)

    def __len__(self) -> int:
        return len(self.norms)

    def report(self) -> dict:
        """JSON-able summary (no tensors) for the pipeline's report."""
        return {
            "nsamples": self.nsamples,
            "scale": self.scale,
            "mean_loss": sum(self.losses) / max(len(self.losses), 1),
            "memory_bytes": dict(self.memory),
            "seconds": round(self.seconds, 3),
            "layers": len(self.norms),
        }


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """What the pipeline prunes in the decoder layers (``models.prunable_modules``: every Linear but the MoE
    routers, each fused expert matrix as an ``ExpertSlice``), keyed by full name (``<layers>.<i>.<rel>``)."""
    from llmprune_kernels.pipeline.models import find_decoder_layers, prunable_modules

    path, layers = find_decoder_layers(model)
    return {f"{path}.{i}.{rel}": m for i, layer in enumerate(layers) for rel, m in prunable_modules(layer).items()}


def _parameter_of(lin: nn.Linear) -> tuple[nn.Parameter, int | None]:
    """The parameter holding ``lin``'s weight and the index of the weight in it (None: the whole parameter)."""
    from llmprune_kernels.pipeline.experts import ExpertSlice

    if isinstance(lin, ExpertSlice):
        return getattr(lin.experts, lin.param), lin.index
    return lin.weight, None


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def collect_gradient_norms(
    model: nn.Module,
    samples: Iterable[torch.Tensor] | Sequence[torch.Tensor],
    *,
    scale: float = GBLM_SCALE,
    names: Sequence[str] | None = None,
    accumulate_device: torch.device | str | None = None,
    store_dtype: torch.dtype = torch.float16,
    progress: bool = False,
) -> GradientNorms:
    """GBLM gradient norms G = sqrt(sum_n (scale * dL_n/dW)^2) for the decoder Linears of ``model``.

    ``samples``: token-id tensors of shape (L,) or (1, L), one calibration window each. ``names``: restrict
    to these module names (default: every Linear of every decoder layer). ``accumulate_device``: where
    the fp32 accumulators live (default: each weight's device; "cpu" moves them off the GPU as the
    reference does). ``store_dtype``: dtype of the returned G (fp16 as the reference; fp32 keeps more).
    """
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"gradient scale {scale!r} is invalid; allowed: a positive number (reference: 100)")
    linears = decoder_linears(model)
    if names is not None:
        unknown = [n for n in names if n not in linears]
        if unknown:
            raise ValueError(f"no decoder Linear named {unknown[0]!r}; known e.g. {next(iter(linears), None)!r}")
        linears = {n: linears[n] for n in names}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear modules in its decoder layers")

    params = list(model.parameters())
    saved_requires_grad = [p.requires_grad for p in params]
    was_training = model.training
    device = next(iter(linears.values())).weight.device
    # One accumulator per parameter: a fused experts parameter serves every expert's slice of it.
    where = {name: _parameter_of(lin) for name, lin in linears.items()}
    targets = {id(p): p for p, _ in where.values()}
    acc: dict[int, torch.Tensor] = {}
    handles = []
    largest_grad = [0]  # bytes of the largest gradient held at once (each is dropped in its hook)

    def make_hook(key: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            largest_grad[0] = max(largest_grad[0], g.numel() * g.element_size())
            # Reference: grad.float(), then (grad * scale) ** 2 accumulated in fp32.
            acc[key].add_((g.float() * scale).square().to(acc[key].device))
            p.grad = None  # drop it at once: no full set of gradients is ever held

        return hook

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    rss_before = _rss_peak_bytes()
    losses: list[float] = []
    try:
        for p in params:
            p.requires_grad_(False)
        for key, w in targets.items():
            acc[key] = torch.zeros(w.shape, dtype=torch.float32, device=accumulate_device or w.device)
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(key)))
        model.eval()
        it = samples
        if progress:
            from tqdm.auto import tqdm

            total = len(samples) if isinstance(samples, Sequence) else None
            it = tqdm(samples, desc="GBLM gradients", unit="sample", total=total, dynamic_ncols=True)
        for i, ids in enumerate(it):
            ids = torch.as_tensor(ids)
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
                raise ValueError(
                    f"calibration sample {i} has shape {tuple(ids.shape)}; allowed: (L,) or (1, L) token ids, L >= 2"
                )
            ids = ids.to(device)
            with torch.enable_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise ValueError(f"calibration sample {i}: causal-LM loss is {loss.item()}; "
                                     "gradients need a finite loss")
                loss.backward()
            losses.append(float(loss.detach()))
        if not losses:
            raise ValueError("no calibration samples were given for the GBLM gradients")
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(params, saved_requires_grad):
            p.grad = None
            p.requires_grad_(rg)
        model.train(was_training)

    memory = {
        "accumulator_bytes": sum(a.numel() * a.element_size() for a in acc.values()),
        "weight_bytes": sum(w.numel() * w.element_size() for w in targets.values()),
        "largest_grad_bytes": largest_grad[0],
        "process_peak_rss_bytes": max(_rss_peak_bytes(), rss_before),
    }
    if device.type == "cuda":
        memory["cuda_peak_bytes_above_start"] = torch.cuda.max_memory_allocated(device) - base_cuda
    last = {id(p): name for name, (p, _) in where.items()}  # each accumulator is freed after its last reader
    norms, rooted = {}, set()
    for name, (p, index) in where.items():
        a = acc[id(p)]
        if id(p) not in rooted:
            a.sqrt_()
            rooted.add(id(p))
        g = a if index is None else a[index]
        check_finite(g, f"GBLM gradient norm of {name}")
        norms[name] = g.to(store_dtype)
        if last[id(p)] == name:
            del acc[id(p)]
    return GradientNorms(
        norms=norms, nsamples=len(losses), scale=float(scale), losses=losses, memory=memory,
        seconds=time.perf_counter() - start,
    )
