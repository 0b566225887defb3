"""Checks of user input, each raising an error that names the bad value and what is allowed."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparsityConfig:
    """What to prune: a fraction ``sparsity`` per output row (unstructured), or ``n`` of every ``m``.

    N:M follows the convention of the SparseGPT and Wanda reference code: the ``n`` lowest-scoring
    weights of every ``m`` consecutive input columns are pruned (2:4 and 4:8 read the same either way).
    """

    sparsity: float | None = None  # None: 0.5 unstructured, n/m for N:M
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        n, m = _integer("N", self.n), _integer("M", self.m)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        if self.is_nm:
            check_nm(n, m)
            given = self.sparsity
            if given is not None and (isinstance(given, bool) or not isinstance(given, (int, float))
                                      or not math.isclose(given, n / m, rel_tol=0.0, abs_tol=1e-9)):
                raise ValueError(f"sparsity {given!r} contradicts the N:M pattern {n}:{m} (sparsity {n / m:g}); "
                                 f"allowed: leave sparsity out for N:M, or give exactly n/m")
            object.__setattr__(self, "sparsity", n / m)
        else:
            if n or m:
                raise ValueError(f"N:M pattern {n}:{m} is invalid: both N and M must be positive")
            object.__setattr__(self, "sparsity", check_sparsity(0.5 if self.sparsity is None else self.sparsity))

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


def _integer(what: str, value) -> int:
    """``value`` as a Python int: ints and integer types such as numpy's, not bools, floats or strings."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} {value!r} ({type(value).__name__}) is not an integer; allowed: an integer "
                        f"(N:M patterns such as 2:4, 4:8)")
    return operator.index(value)


def check_nm(n: int, m: int, width: int | None = None) -> None:
    """N:M needs integers 1 <= N < M (numpy integers too), and the row width (if given) divisible by M."""
    n, m = _integer("N", n), _integer("M", m)
    if n < 1 or m < 2 or n >= m:
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
    check_finite_nonnegative(act_norm_sq, "activation norms")


def check_finite_nonnegative(t: torch.Tensor, what: str) -> None:
    """``check_finite`` and ``check_nonnegative`` at the cost of one reduction (one device sync)."""
    if t.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(t.detach().float())).tolist()  # NaN anywhere makes both NaN
    if math.isfinite(lo) and math.isfinite(hi) and lo >= 0:
        return
    check_finite(t, what)
    check_nonnegative(t, what)


def check_nonnegative(t: torch.Tensor, what: str) -> None:
    """Raise if ``t`` holds a negative value (squared norms, Hessian diagonals), naming the first one."""
    neg = t < 0
    if bool(neg.any()):
        first = neg.flatten().nonzero()[0, 0]
        raise ValueError(f"{what} hold {int(neg.sum())} negative value(s), the first {float(t.flatten()[first]):g} "
                         f"at flat index {int(first)}; allowed: values >= 0 (squared norms)")


def check_config(config: object) -> "SparsityConfig":
    """``config`` must be a :class:`SparsityConfig`; a bare number or pattern string gets a hint."""
    if isinstance(config, SparsityConfig):
        return config
    hint = ""
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        hint = f"; for {config:g} unstructured pass SparsityConfig({config!r})"
    elif isinstance(config, str):
        hint = f"; for a pattern pass SparsityConfig.parse(pattern={config!r})"
    raise TypeError(f"config {config!r} ({type(config).__name__}) is not a SparsityConfig{hint}; allowed: "
                    f"SparsityConfig(sparsity) or SparsityConfig(n=N, m=M)")


def check_max_retries(max_retries: object) -> int:
    """Cholesky retries: an integer >= 0."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries {max_retries!r} is invalid; allowed: an integer >= 0 (0 = no retry)")
    return max_retries
