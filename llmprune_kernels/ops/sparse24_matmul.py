"""Triton 2:4 decode kernel: ``y = x @ W.T (+ bias)`` reading our compressed values and metadata.

Built for small M (decode, M <= 16), where a matmul is bound by reading the weight once: fp16/bf16 2:4
moves 4.5 bytes per 4 weights (2 kept values + one 4-bit index nibble) instead of dense's 8, a 1.78x
limit. Each program owns BLOCK_N output rows and streams their compressed values + metadata over K,
expands every tile to its dense form in registers (no shared-memory scatter: four ``where`` selects per
group and two ``join``s restore column order) and feeds ``tl.dot`` with x padded to 16 rows. Larger M
runs correctly with a second grid axis, but cuSPARSELt or dense win there (see SparseLinear dispatch).
Reference: :func:`llmprune_kernels.reference.sparse24_matmul.sparse24_linear_reference`.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional dependency
    HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAS_TRITON:

    @triton.jit
    def _sparse24_mm_kernel(
        x_ptr, v_ptr, m_ptr, b_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_vn, stride_mn, stride_ym,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # Compressed values of BLOCK_K dense columns: BLOCK_K/2 contiguous elements per row.
            offs_c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            v = tl.load(
                v_ptr + offs_n[:, None] * stride_vn + offs_c[None, :],
                mask=n_ok[:, None] & (offs_c[None, :] < K // 2), other=0.0,
            )
            v0, v1 = tl.split(tl.reshape(v, [BLOCK_N, BLOCK_K // 4, 2]))
            # Metadata: one byte per two groups, low nibble first.
            offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            mb = tl.load(
                m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
                mask=n_ok[:, None] & (offs_b[None, :] < (K + 4) // 8), other=0,
            ).to(tl.int32)
            nib = tl.reshape(tl.join(mb & 15, mb >> 4), [BLOCK_N, BLOCK_K // 4])
            i0 = nib & 3
            i1 = nib >> 2
            zero = tl.zeros_like(v0)
            # i0 < i1, so column 0 can only hold v0 and column 3 only v1.
            d0 = tl.where(i0 == 0, v0, zero)
            d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
            d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
            d3 = tl.where(i1 == 3, v1, zero)
            # join(join(d0, d2), join(d1, d3)) flattens to d0, d1, d2, d3 per group.
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BLOCK_N, BLOCK_K])
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0,
            )
            if IEEE:
                # fp32 weights (and bf16 under the Triton interpreter, whose bf16 dot is wrong): fp32 math.
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :],
        )

    # Decode configs: a few row-block / K-block shapes; the best depends on (N, K) (wave count vs.
    # bytes in flight per SM). Tuned once per weight shape, before any CUDA-graph capture.
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bn, bk, nw, ns in [
            (16, 256, 4, 3), (16, 256, 4, 5), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3),
            (64, 256, 8, 3), (16, 1024, 8, 2),
        ]
    ]
    _tuned_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "IEEE"])(_sparse24_mm_kernel)


def sparse24_mm(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
    in_features: int | None = None, block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W.T (+ bias)`` for the packed 2:4 weight ``(values [out, in/2], meta)``.

    ``block=(BLOCK_N, BLOCK_K)`` fixes the tile (tests); otherwise the autotuned config is used on a
    GPU and a small fixed tile under the Triton interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse24_mm needs triton; install it or use SparseLinear's dense / reference path")
    n = values.shape[0]
    k = in_features if in_features is not None else values.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; the packed weight has {k}")
    if x.dtype != values.dtype:
        raise TypeError(f"x dtype {x.dtype} differs from the weight dtype {values.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    ieee = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
    block_m = 16
    args = (x2, values, meta, bias if bias is not None else values, y, m, n, k,
            x2.stride(0), values.stride(0), meta.stride(0), y.stride(0))
    if block is not None or _INTERPRET or not x.is_cuda:
        bn, bk = block if block is not None else (16, 64)
        grid = (triton.cdiv(n, bn), triton.cdiv(m, block_m))
        _sparse24_mm_kernel[grid](*args, HAS_BIAS=bias is not None, IEEE=ieee,
                                  BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    else:
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
        _tuned_kernel[grid](*args, HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_M=block_m)
    return y.reshape(*lead, n)


if HAS_TRITON:
    # torch.library registration so the kernel is opaque to torch.compile (and still capturable in
    # CUDA graphs); the eager path in SparseLinear calls sparse24_mm directly to skip the op overhead.
    @torch.library.custom_op("llmprune_kernels::sparse24_mm", mutates_args=())
    def sparse24_mm_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                       bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
        return sparse24_mm(x, values, meta, bias, in_features)

    @sparse24_mm_op.register_fake
    def _(x, values, meta, bias, in_features):
        return x.new_empty(*x.shape[:-1], values.shape[0])
