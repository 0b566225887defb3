"""The 8-bit x 8-bit 2:4 backend ``cslt8``: cuSPARSELt's sparse tensor-core GEMM (through torch's
``torch._cslt_compress`` / ``torch._cslt_sparse_mm``) on the 8-bit weight, with the activations quantised per
token to the same 8-bit type, for M > 16 and per-output-channel scales.

``y[t, r] = (sum_k Wq[r, k] * xq[t, k]) * ws[r] * s[t] + b[r]`` with ``Wq`` / ``ws`` the weight's 8-bit values and
per-channel scale (:mod:`llmprune_kernels.sparse24.quant8`) and ``xq = x / s`` per token
(:func:`quantize_per_token`, one Triton launch; FP8 e4m3 on GPUs of compute capability 8.9+, INT8 anywhere
cuSPARSELt runs).

* The weight is expanded once to its dense 8-bit form (zeros where pruned) and compressed by cuSPARSELt.
* ``_cslt_sparse_mm(compressed W [n, k], xq.t(), alpha=ws / OUT_SHIFT, out_dtype=x.dtype,
  transpose_result=True)`` gives ``[M, n]`` in x's dtype (fp16 / bf16): the activations are cuSPARSELt's
  transposed dense operand (the TN layout its 8-bit kernels take), and the alpha vector (one float32 per row of
  the sparse operand, i.e. per output channel) applies the weight scale in the epilogue. ``OUT_SHIFT`` (512 for
  FP8, 128 for INT8) keeps that fp16 intermediate below the row's L1 norm; ``s * OUT_SHIFT`` is exact in x's
  dtype (``activation_scales`` rounds ``s`` up to it), so the last step ``addcmul(b, out, s * OUT_SHIFT)`` is one
  rounding. Where the alpha vector does not scale per row on this build (checked once per 8-bit type and
  output dtype, :func:`alpha_vector_ok`), the product comes out in fp32 / int32 and both scales are applied
  elementwise instead.
* M is padded to a multiple of 16 (zero tokens), as torch pads the dense operand of its cuSPARSELt tensors.

Only modules that hold 8-bit per-channel weights and opted in (``SparseLinear8.activations = "8bit"``,
``SemiSparseWeightConfig(activations="8bit")``) run it, where tuning measured it faster than the module's
16-bit 2:4 fallback (:mod:`llmprune_kernels.sparse24.tuning8`).
Reference: :func:`llmprune_kernels.reference.sparse24_8bit.sparse24_8bit_act_linear_reference`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune_kernels.ops.score_mask import triton_usable
from llmprune_kernels.sparse24.backends._quant_act import quantize_tokens
from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.pack import expand_24
from llmprune_kernels.sparse24.quant8 import OUT_SHIFT, QMAX, Packed24Q8, activation_scales, fp8_ok

MIN_M = 17  # M <= 16 is the decode kernel's (decode8)
PAD_M = 16  # cuSPARSELt's 8-bit dense operand: rows padded to a multiple of 16
ALG_IDS = range(4)  # cuSPARSELt algorithm ids tuning measures (ids the build lacks simply fail to run)
OUT_DTYPES = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result  # asked in traced forwards; dynamo skips torch.backends' function
def available() -> bool:
    """torch was built with cuSPARSELt and a GPU is visible."""
    return torch.cuda.is_available() and torch.backends.cusparselt.is_available()


def shape_ok(out_features: int, in_features: int) -> bool:
    """cuSPARSELt 8-bit 2:4: out % 32 == 0 and in % 64 == 0 (torch's own 8-bit limits are 32 x 32)."""
    return out_features % 32 == 0 and in_features % 64 == 0


@dataclass
class Cslt8State:
    """The weight as cslt8 runs it."""

    compressed: torch.Tensor  # torch._cslt_compress of the dense 8-bit 2:4 weight [n, k]
    alpha: torch.Tensor  # [n] float32: the per-channel weight scale / OUT_SHIFT (cuSPARSELt's alpha vector)
    qdtype: torch.dtype
    shape: tuple[int, int]


def prepare_cslt8(q: Packed24Q8) -> Cslt8State:
    """Compress an 8-bit per-channel 2:4 CUDA weight for cuSPARSELt (raises naming what does not fit)."""
    if not isinstance(q, Packed24Q8):
        raise ValueError(f"backend 'cslt8' runs 8-bit 2:4 weights (SparseLinear8, quantize_24); got a {q.dtype} 2:4 "
                         f"packing: sparsify_ with SemiSparseWeightConfig(weight_dtype='fp8' or 'int8', "
                         f"activations='8bit')")
    n, k = q.shape
    if q.group_size is not None:
        raise ValueError(f"backend 'cslt8' applies one weight scale per output channel; this weight has group_size="
                         f"{q.group_size} (allowed: group_size=None)")
    if not q.values.is_cuda or not shape_ok(n, k):
        raise ValueError(f"backend 'cslt8' needs a CUDA weight with out_features % 32 == 0 and in_features % 64 == 0, "
                         f"got {(n, k)} on {q.values.device}")
    if q.values.dtype == torch.float8_e4m3fn and not fp8_ok(q.values.device):
        raise ValueError("backend 'cslt8' with FP8 needs compute capability 8.9 or newer: use weight_dtype='int8'")
    raw = q.values.view(torch.uint8) if q.values.dtype == torch.float8_e4m3fn else q.values
    dense = expand_24(raw, q.meta, k).view(q.values.dtype)  # zero bytes are +0.0 in e4m3 too
    return Cslt8State(torch._cslt_compress(dense), (q.scale.float()[:, 0] / OUT_SHIFT[q.values.dtype]).contiguous(),
                      q.values.dtype, (n, k))


def quantize_per_token(x2: torch.Tensor, qdtype: torch.dtype, scale_dtype: torch.dtype | None = None,
                       rows: int | None = None, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [rows, k] qdtype, s [M, 1] scale_dtype)`` for a 2-D ``x2 [M, k]``: ``xq[:M] = x2 / s`` (the division in
    fp32, INT8 rounded half to even and clamped to +-127, FP8 clamped to +-448), zero rows below M.
    ``fused`` (default: where Triton runs on x's device) computes scales and codes in one Triton launch
    (:mod:`._quant_act`), else in PyTorch ops; both are bit for bit
    :func:`~llmprune_kernels.reference.sparse24_8bit.quantize_activations_reference`."""
    m, k = x2.shape
    rows = m if rows is None else rows
    scale_dtype = scale_dtype or x2.dtype
    if fused if fused is not None else triton_usable(x2.device):
        return quantize_tokens(x2, qdtype, scale_dtype, rows)
    s = activation_scales(torch.linalg.vector_norm(x2, float("inf"), dim=-1), qdtype, scale_dtype).unsqueeze(1)
    xq = torch.empty(rows, k, device=x2.device, dtype=qdtype)
    if rows > m:
        xq[m:].view(torch.uint8).zero_()
    v = torch.div(x2, s.float())  # fp32 (a float32 divisor promotes), as the reference divides
    if qdtype == torch.int8:
        v.round_()
    qmax = QMAX[qdtype]
    xq[:m].copy_(v.clamp_(-qmax, qmax))
    return xq, s


_ALPHA_OK: dict[tuple, bool] = {}


def alpha_vector_ok(qdtype: torch.dtype, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``_cslt_sparse_mm``'s alpha vector scales each output channel for this 8-bit type and output dtype
    on ``device`` (one small matmul, kept per process; False without caching while a CUDA graph is captured)."""
    key = (qdtype, out_dtype, torch.device(device).index)
    if key in _ALPHA_OK:
        return _ALPHA_OK[key]
    if torch.cuda.is_current_stream_capturing():
        return False
    w = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device).repeat(64, 32).to(qdtype)  # [64, 128]: 64 ones a row
    alpha = torch.tensor([2.0 ** -(i % 8) for i in range(64)], device=device)
    x = torch.ones(32, 128, device=device).to(qdtype)
    try:
        y = torch._cslt_sparse_mm(torch._cslt_compress(w), x.t(), None, alpha, out_dtype, True)
        ok = tuple(y.shape) == (32, 64) and bool(torch.allclose(y.float(), 64 * alpha.expand(32, 64), rtol=1e-2))
    except RuntimeError:
        ok = False
    _ALPHA_OK[key] = ok
    return ok


def cslt8_runner(state: Cslt8State, bias: torch.Tensor | None, m: int, config=None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(x) = x @ W.T (+ bias)`` for fp16 / bf16 inputs of exactly ``m`` rows (any leading shape)."""
    n, k = state.shape
    rows = -(-m // PAD_M) * PAD_M
    alg = int(config or 0)
    shift = OUT_SHIFT[state.qdtype]

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in OUT_DTYPES:
            raise TypeError(f"backend 'cslt8' takes torch.float16 or torch.bfloat16 activations; x is {x.dtype}")
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} input features; the 8-bit 2:4 weight has {k}")
        xq, s = quantize_per_token(x.reshape(m, k), state.qdtype, x.dtype, rows)
        t = s * shift  # exact: activation_scales keeps s * OUT_SHIFT finite in x's dtype
        if alpha_vector_ok(state.qdtype, x.dtype, x.device):
            y = torch._cslt_sparse_mm(state.compressed, xq.t(), None, state.alpha, x.dtype, True, alg)[:m]
            y = y.mul_(t) if bias is None else torch.addcmul(bias, y, t)
        else:  # both scales elementwise, in fp32 (the raw FP8 / INT8 product overflows fp16)
            acc = torch.float32 if state.qdtype == torch.float8_e4m3fn else torch.int32
            y = torch._cslt_sparse_mm(state.compressed, xq.t(), None, None, acc, True, alg)[:m].float()
            y = y * (state.alpha * shift) * s.float()
            y = (y if bias is None else y + bias.float()).to(x.dtype)
        return y.view(*x.shape[:-1], n)
    return run


class Cslt8Backend(Backend):
    """cuSPARSELt 8-bit x 8-bit 2:4 GEMM with per-token activation quantisation; M > 16, per-channel scales."""

    name = "cslt8"
    min_m = MIN_M
    quantized = True  # prepares from the 8-bit packing (Packed24Q8)
    traceable = False  # no torch.compile op: compiled graphs run the 16-bit decode op on the dequantised weight

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and available()

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        """``dtype``: the weight values' dtype; only 8-bit weights (16-bit modules never dispatch here)."""
        return dtype in QMAX and shape_ok(out_features, in_features)

    def usable(self, out_features, in_features, dtype, device) -> bool:
        return super().usable(out_features, in_features, dtype, device) and (
            dtype != torch.float8_e4m3fn or fp8_ok(device))

    def prepare(self, packed, config=None) -> Cslt8State:
        return prepare_cslt8(packed)

    def default_config(self, out_features, in_features, dtype, m):
        return 0

    def bind(self, state, config, m, in_features, out_features, bias):
        return cslt8_runner(state, bias, m, config)

    def call(self, state, config, x, out_features, bias):
        return cslt8_runner(state, bias, x.numel() // x.shape[-1], config)(x)

    def describe(self, config) -> str:
        return f"cuSPARSELt alg {int(config or 0)}"

    def config_to_json(self, config):
        return int(config or 0)

    def config_from_json(self, value):
        return int(value)

    def tune(self, states, x, out_features, time_fn):
        """Time the algorithm ids ``ALG_IDS`` (cycling through the weight copies ``states``)."""
        m = x.shape[0]
        times, fns = {}, {}
        for alg in ALG_IDS:
            fns[alg] = [lambda s=s, a=alg: cslt8_runner(s, None, m, a)(x) for s in states]
            try:
                times[alg] = time_fn(fns[alg], trials=3)
            except RuntimeError:  # an id this build or problem lacks does not compete
                continue
        if not times:
            raise RuntimeError(f"no cuSPARSELt 8-bit algorithm runs {out_features}x{x.shape[1]} at M={m}")
        best = min(times, key=times.get)
        return best, times[best], fns[best]
