"""SparseGPT through the C++/CUDA extension (``csrc/sparsegpt/``), with the reference as fallback.

``torch.ops.llmprune_kernels.sparsegpt_prune`` runs the whole ``fasterprune`` in C++: dead columns, damping
with Cholesky retries, the inverse-Hessian factor (ATen linalg: LAPACK on CPU, cuSOLVER on CUDA), and per
block of columns one kernel that runs the sequential column loop with rows in parallel, then one GEMM for
the later columns. With ``fast_inverse=False`` it equals ``reference.sparsegpt.sparsegpt_prune``: same
masks, and in fp32 with TF32 off the same weights (bit-identical in practice: same ATen calls, the same
IEEE operations in the column loop, no fused multiply-add). On CUDA the default computes the
inverse-Hessian factor in fp64 from one factorisation (``fast_inverse``, see ``sparsegpt_prune``): faster,
and closer to SparseGPT in exact arithmetic than the fp32 reference, whose rounding flips mask entries on
real layers.

TF32 (``tf32=True``) lets the fp32 GEMMs (Hessian accumulation, lazy block updates) run in TF32 on CUDA;
the column loop and the factorisations keep their precision. Measured on the H100
at LLaMA-7B shapes (benchmarks/results/sparsegpt.json): 5-9% faster per layer, 0.05% (4096 columns)
to 1.7% (11008 columns) of mask entries differ from the fp32 result, weights differ by 2-13% in relative
Frobenius norm (mostly the flipped entries), and the SparseGPT loss changes by less than 1e-4 relative.
Use it when bit-exactness against the reference is not needed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from llmprune_kernels import _ext
from llmprune_kernels.reference import sparsegpt as ref
from llmprune_kernels.selection import check_threshold
from llmprune_kernels.validation import (SparsityConfig, calibration_batch, check_config, check_max_retries, check_nm,
                                         check_weight)

BACKENDS = ("auto", "reference", "ext")


def ext_available(device: torch.device | str) -> bool:
    """``_C`` is built, for ``device``'s type (CUDA needs a CUDA build); the op's schema is in library.py."""
    if not _ext.HAS_EXT:
        return False
    return torch.device(device).type == "cpu" or (torch.device(device).type == "cuda" and _ext.ext_with_cuda())


CUDA_MAX_BLOCKSIZE = 128  # the CUDA kernel keeps the block's Hinv slice in shared memory


def resolve_backend(backend: str, device: torch.device | str, blocksize: int = 128) -> str:
    """``auto`` -> ``ext`` where it is built for the device (and, on CUDA, blocksize <= 128), else
    ``reference``; ``ext`` must be available."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown SparseGPT backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    cuda_too_wide = torch.device(device).type == "cuda" and blocksize > CUDA_MAX_BLOCKSIZE
    if backend == "auto":
        return "ext" if ext_available(device) and not cuda_too_wide else "reference"
    if backend == "ext" and cuda_too_wide:
        raise ValueError(f"the CUDA SparseGPT kernel supports blocksize <= {CUDA_MAX_BLOCKSIZE}, got {blocksize}")
    if backend == "ext" and not ext_available(device):
        why = _ext.EXT_ERROR or f"_C lacks sparsegpt_prune for {torch.device(device).type}"
        raise RuntimeError(f"SparseGPT backend 'ext' is not available on {device}: {why}")
    return backend


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """TF32 on or off for CUDA fp32 matmuls inside the block, then restored; untouched when already right.

    Uses the ``fp32_precision`` API of torch >= 2.9 (reading the legacy ``allow_tf32`` after a mix of both
    APIs raises); the default state ("none": no TF32, like the reference code) is left alone when
    ``enabled`` is False.
    """
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):  # pragma: no cover - torch < 2.9
        old = m.allow_tf32
        m.allow_tf32 = enabled
        try:
            yield
        finally:
            m.allow_tf32 = old
        return
    old = m.fp32_precision
    if (old == "tf32") == enabled:
        yield
        return
    m.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        m.fp32_precision = old


TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
_FUSED_ADDMM: dict[torch.device, bool] = {}


def tensor_cores_apply(x: torch.Tensor, tensor_cores: bool = True) -> bool:
    """``gram_add_`` multiplies ``x`` on tensor cores: fp16/bf16 on CUDA, with ``tensor_cores`` on."""
    return bool(tensor_cores) and x.is_cuda and x.dtype in TENSOR_CORE_DTYPES


def _fused_addmm(device: torch.device) -> bool:
    """``torch.addmm(S, a, b, out_dtype=float32, out=S)`` with an fp32 ``S`` and fp16 ``a``, ``b`` works here.

    Checked once per device on a 2 x 2 case (older torch builds require ``S`` in the inputs' dtype); where
    it does not, ``gram_add_`` multiplies into a temporary and adds it.
    """
    if device not in _FUSED_ADDMM:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
        S = torch.ones(2, 2, device=device)
        try:
            torch.addmm(S, a.half(), a.half(), beta=2.0, alpha=0.5, out_dtype=torch.float32, out=S)
            _FUSED_ADDMM[device] = bool(torch.equal(S, 2.0 + 0.5 * (a @ a)))
        except RuntimeError:
            _FUSED_ADDMM[device] = False
    return _FUSED_ADDMM[device]


@torch.no_grad()
def gram_add_(S: torch.Tensor, x: torch.Tensor, alpha: float = 1.0, beta: float = 1.0,
              tensor_cores: bool = True, split: int | None = None) -> torch.Tensor:
    """``S <- beta * S + alpha * x^T x`` in place for an fp32 ``S`` (in, in) and activations ``x`` (tokens, in).

    fp16/bf16 ``x`` on CUDA (``tensor_cores``): one tensor-core GEMM with fp32 accumulation
    (``addmm(..., out_dtype=torch.float32)``); each product of two fp16/bf16 values is exact in fp32, so the
    result differs from ``gram_add_reference`` (x cast to fp32 first) only in the summation order.
    Elsewhere (CPU, fp32, ``tensor_cores=False``): ``x`` cast to fp32 and one fp32 ``addmm_`` (TF32 where the
    caller enabled it). See ``HESSIAN_TOLERANCE`` for what the tests hold it to.

    ``split`` (0 < h < in): only the blocks ``[:h, :h]``, ``[:h, h:]`` and ``[h:, h:]`` are updated, three GEMMs
    doing 3/4 of the multiply-adds of the symmetric product; ``[h:, :h]`` is left as it is, for
    ``mirror_split_`` to fill once after the last batch.
    """
    if split is None:
        return _gram_block_(S, x, x, alpha, beta, tensor_cores)
    h = int(split)
    if not 0 < h < S.shape[0]:
        raise ValueError(f"gram_add_ split={split!r} is invalid; allowed: 0 < split < {S.shape[0]}")
    a, b = x[:, :h], x[:, h:]
    _gram_block_(S[:h, :h], a, a, alpha, beta, tensor_cores)
    _gram_block_(S[:h, h:], a, b, alpha, beta, tensor_cores)
    _gram_block_(S[h:, h:], b, b, alpha, beta, tensor_cores)
    return S


def _gram_block_(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float,
                 tensor_cores: bool) -> torch.Tensor:
    """``S <- beta * S + alpha * a^T b`` (``S`` may be a strided block of a larger matrix)."""
    if tensor_cores_apply(a, tensor_cores):
        if _fused_addmm(a.device):
            return torch.addmm(S, a.t(), b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=S)
        prod = torch.mm(a.t(), b, out_dtype=torch.float32)
        return S.mul_(beta).add_(prod, alpha=alpha) if beta != 1 else S.add_(prod, alpha=alpha)
    af, bf = a.float(), b.float()
    return S.addmm_(af.t(), bf, beta=beta, alpha=alpha)


def mirror_split_(S: torch.Tensor, split: int) -> torch.Tensor:
    """Fill the block ``[h:, :h]`` that ``gram_add_(..., split=h)`` skips with the transpose of ``[:h, h:]``."""
    S[split:, :split].copy_(S[:split, split:].t())
    return S


def gram_split(columns: int, device: torch.device | str, tensor_cores: bool = True) -> int | None:
    """The ``split`` ``HessianSum`` gives ``gram_add_``: half the columns (a multiple of 64) on CUDA for widths
    of at least ``GRAM_SPLIT_MIN``, where three half-size GEMMs beat one full one; else None."""
    if columns < GRAM_SPLIT_MIN or torch.device(device).type != "cuda" or not tensor_cores:
        return None
    return columns // 128 * 64


GRAM_SPLIT_MIN = 2048


@torch.no_grad()
def gram_add_reference(S: torch.Tensor, x: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Plain-PyTorch reference of ``gram_add_``: x cast to fp32, ``S * beta + alpha * (x^T @ x)``."""
    xf = x.float()
    S.mul_(beta)
    return S.add_(xf.t() @ xf, alpha=alpha)


# |fast - reference| <= HESSIAN_TOLERANCE * max(diag(reference)) for every entry, where both accumulate the same
# (2/n) sum x x^T in fp32 (running mean or raw sum, fp32 cast or tensor cores): they differ in rounding only.
HESSIAN_TOLERANCE = 1e-5


@torch.no_grad()
def hessian_add_batch(H: torch.Tensor, nsamples: int, inp: torch.Tensor, backend: str = "auto",
                      tf32: bool = False, name: str = "activations", tensor_cores: bool = True) -> int:
    """Add a calibration batch to the running Hessian ``H`` in place; returns the new sample count.

    fp16/bf16 activations on CUDA go through ``gram_add_`` on tensor cores (with ``tensor_cores``, the
    default; within ``HESSIAN_TOLERANCE`` of the reference): the running-mean rescale becomes the GEMM's
    ``beta``, no extra pass over H. Otherwise the extension's op (``backend='ext'``) or the reference.
    """
    with tf32_matmul(tf32):
        if tensor_cores_apply(inp, tensor_cores):
            x, batch = calibration_batch(inp, H.shape[0], name)
            gram_add_(H, x, alpha=2 / (nsamples + batch), beta=nsamples / (nsamples + batch))
            return nsamples + batch
        if resolve_backend(backend, H.device) == "ext":
            calibration_batch(inp, H.shape[0], name)  # the same checks as the reference
            return int(torch.ops.llmprune_kernels.sparsegpt_add_batch(H, inp, nsamples))
        return ref.accumulate_hessian(H, nsamples, inp, name)


def resolve_fast_inverse(fast_inverse: bool | None, backend: str, device: torch.device | str) -> bool:
    """``None`` -> the fp64 one-factorisation inverse where the extension runs on CUDA (the speed target),
    else the reference's factor; ``True`` needs the extension."""
    if fast_inverse is None:
        return backend == "ext" and torch.device(device).type == "cuda"
    if fast_inverse and backend != "ext":
        raise ValueError("fast_inverse needs the 'ext' backend (the reference follows the published code)")
    return bool(fast_inverse)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    config: SparsityConfig,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 4,
    backend: str = "auto",
    tf32: bool = False,
    name: str = "layer",
    fast_inverse: bool | None = None,
    threshold: str = "exact",
) -> tuple[ref.SparseGPTResult, str]:
    """SparseGPT of one layer; returns the result (weight in the input dtype, mask, losses, damping, retries)
    and the backend that ran (``ext`` or ``reference``). Inputs are not modified.

    ``fast_inverse`` (extension only; ``None``: on for CUDA, off elsewhere): the inverse-Hessian factor from
    one fp64 Cholesky factorisation of the reversed matrix and a triangular inverse by GEMMs, rounded to
    fp32 once, instead of the reference's three fp32 LAPACK / cuSOLVER calls. The same matrix in exact
    arithmetic, 3-4x faster at 11008 columns on the H100, and closer to the exact result than the reference:
    against SparseGPT run in fp64 (``reference.sparsegpt_prune(..., compute_dtype=torch.float64)``) its
    weights differ by <= 2e-6 relative where the reference's differ by up to 1.2e-5 (python_tests,
    near-singular Hessian). It is not bit-identical to the reference: on large ill-conditioned layers
    (the benchmark's 11008 columns from 8192 tokens) masks differ at near-ties, and a flip changes the later
    updates (benchmarks/results/sparsegpt.json gives the fractions and the loss change).
    ``fast_inverse=False`` reproduces the reference bit for bit (same ATen calls). The result's
    ``fast_inverse`` says which factor ran.

    ``threshold="published"`` (the authors' per-block ``score <= sorted[k]`` mask, unstructured) runs on the
    reference: ``auto`` picks it, ``ext`` is an error (the extension implements the exact-count rule only).
    N:M runs as usual (the convention changes nothing there).
    """
    check_weight(weight)
    config = check_config(config)
    check_max_retries(max_retries)
    if H.device != weight.device:
        raise ValueError(f"{name}: Hessian is on {H.device} but the weight on {weight.device}")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize {blocksize!r} must be a positive integer")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp {percdamp!r} must be a finite number >= 0")
    check_threshold(threshold)
    if threshold == "published" and not config.is_nm:
        if backend == "ext":
            raise ValueError("SparseGPT threshold='published' runs on the reference only; use backend 'auto' "
                             "or 'reference' (the extension implements threshold='exact')")
        backend = "reference"
    used = resolve_backend(backend, weight.device, blocksize)
    fast_inverse = resolve_fast_inverse(fast_inverse, used, weight.device)
    with tf32_matmul(tf32):
        if used == "reference":
            return ref.sparsegpt_prune(weight, H, config, blocksize, percdamp, max_retries, name,
                                       threshold=threshold), used
        ref.check_hessian(H, weight.shape[1], name)
        ref.check_finite_weight(weight, name)  # the reference's check (its own entry runs it on that path)
        if config.is_nm:
            check_nm(config.n, config.m, weight.shape[1])
            if blocksize % config.m:
                raise ValueError(f"blocksize {blocksize} must be a multiple of M={config.m} for N:M pruning")
        W, mask, losses, damp, retries = torch.ops.llmprune_kernels.sparsegpt_prune(
            weight.detach(), H.detach().float(), float(0.0 if config.is_nm else config.sparsity),
            config.n, config.m, blocksize, float(percdamp), max_retries, name, bool(fast_inverse),
        )
    if retries < 0:  # same outcome and message as the reference's inverse_hessian_factor
        raise RuntimeError(
            f"{name}: Cholesky factorisation failed after {max_retries} retries with growing damping (last "
            f"damping {damp:g}); the Hessian is not usable"
        )
    return ref.SparseGPTResult(W, mask, losses, float(damp), int(retries), fast_inverse), used
