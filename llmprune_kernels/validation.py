"""Checks of user input, each raising an error that names the bad value and what is allowed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparsityConfig:
    """What to prune: a fraction ``sparsity`` per output row (unstructured), or ``n`` of every ``m``.

    N:M follows the convention of the SparseGPT and Wanda reference code: the ``n`` lowest-scoring
    weights of every ``m`` consecutive input columns are pruned (2:4 and 4:8 read the same either way).
    """

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.is_nm:
            check_nm(self.n, self.m)
            object.__setattr__(self, "sparsity", self.n / self.m)
        else:
            if self.n or self.m:
                raise ValueError(f"N:M pattern {self.n}:{self.m} is invalid: both N and M must be positive")
            check_sparsity(self.sparsity)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> "SparsityConfig":
        """Build from a CLI-style ``sparsity`` float or a ``"N:M"`` pattern string (exactly one)."""
        if pattern is not None and sparsity is not None:
            raise ValueError(f"give either sparsity ({sparsity}) or pattern ({pattern!r}), not both")
        if pattern is not None:
            n, m = parse_pattern(pattern)
            return cls(n=n, m=m)
        return cls(sparsity=0.5 if sparsity is None else sparsity)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse ``"N:M"`` into (N, M)."""
    parts = str(pattern).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not of the form N:M with integers, e.g. '2:4'") from None
    check_nm(n, m)
    return n, m


def check_sparsity(sparsity: float) -> float:
    """Sparsity must be a finite number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity {sparsity!r} is not a number; allowed: a float in [0, 1)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside the allowed range [0, 1)")
    return float(sparsity)


def check_nm(n: int, m: int, width: int | None = None) -> None:
    """N:M needs 1 <= N < M, and the row width (if given) divisible by M."""
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2 or n >= m:
        raise ValueError(f"N:M pattern {n}:{m} is invalid: allowed 1 <= N < M (e.g. 2:4, 4:8)")
    if width is not None and width % m != 0:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width to be a multiple of {m}, got width {width}")


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """A prunable weight is a 2-D floating tensor (fp16, bf16 or fp32)."""
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} has dtype {weight.dtype}; allowed: torch.float16, torch.bfloat16, torch.float32")


def check_compressible_24(weight: torch.Tensor, library: str, shape_ok, shape_rule: str) -> None:
    """A weight a 2:4 library (cuSPARSELt, CUTLASS) can compress: 2-D, on CUDA, fp16 / bf16, and
    ``shape_ok(out, in, dtype)`` (described to the user as ``shape_rule``)."""
    if weight.dim() != 2 or not weight.is_cuda:
        raise ValueError(f"{library} compress needs a 2-D CUDA weight, got shape {tuple(weight.shape)} on {weight.device}")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{library} 2:4 needs float16 or bfloat16 weights, got {weight.dtype}")
    if not shape_ok(*weight.shape, weight.dtype):
        raise ValueError(f"{library} 2:4 needs {shape_rule}, got {tuple(weight.shape)}")


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise if ``t`` holds NaN or Inf (e.g. activations fed to a pruner)."""
    if not torch.isfinite(t).all():
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        raise ValueError(f"{what} contains {nan} NaN and {inf} Inf values; pruning needs finite inputs")


def calibration_batch(inp: torch.Tensor, in_features: int, name: str = "activations") -> tuple[torch.Tensor, int]:
    """Check a calibration batch and flatten it to (tokens, in); returns it with its sequence count.

    Takes (batch, seq, in) or (tokens, in); each leading batch entry is one calibration sequence (a 2-D
    input counts as one), as the running means of Wanda's and SparseGPT's ``add_batch`` count them.
    """
    if inp.shape[-1] != in_features:
        raise ValueError(f"{name} have width {inp.shape[-1]}, expected in_features={in_features}")
    check_finite(inp, name)
    return inp.reshape(-1, in_features), (inp.shape[0] if inp.dim() == 3 else 1)


def check_act_norms(weight: torch.Tensor, act_norm_sq: torch.Tensor) -> None:
    """Activation norms fit the weight, (in_features,), and are finite."""
    if act_norm_sq.shape != (weight.shape[1],):
        raise ValueError(
            f"activation norms have shape {tuple(act_norm_sq.shape)}, expected ({weight.shape[1]},) for weight "
            f"{tuple(weight.shape)}"
        )
    check_finite(act_norm_sq, "activation norms")
