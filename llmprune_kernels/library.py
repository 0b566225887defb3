"""Every ``torch.ops.llmprune_kernels`` operator: its schema, its fake (meta) kernel and its autograd formula.

The compiled kernels in ``csrc/`` register only implementations (``TORCH_LIBRARY_IMPL`` per device); the
schemas are defined here, so one file lists the whole operator surface. Fakes let ``torch.compile`` trace
the ops (shapes only); ``torch.library.opcheck`` tests the registrations. The Triton 2:4 decode kernels (16-
and 8-bit values) are Python custom ops, defined here around their launchers. Ops whose kernels were not
compiled in (a CPU build, no cuSPARSELt, no CUTLASS) keep their schema and fake; calling them raises torch's
"no kernel" error, and the Python wrappers check ``_ext`` first.
"""
from __future__ import annotations

import torch

from llmprune_kernels import _ext  # noqa: F401  (_C registers its kernels when loaded)
from llmprune_kernels.sparse24.autograd import linear_grads
from llmprune_kernels.sparse24.pack import expand_24

NAMESPACE = "llmprune_kernels"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901  (kept alive: it owns the definitions)

SCHEMAS = {
    # SparseGPT (csrc/sparsegpt/): Hessian accumulation and the whole fasterprune; CPU and CUDA
    "sparsegpt_add_batch": "(Tensor(a!) H, Tensor inp, int nsamples) -> int",
    "sparsegpt_prune": "(Tensor weight, Tensor H, float sparsity, int prunen, int prunem, int blocksize, "
                       "float percdamp, int max_retries, str name, bool fast_inverse=False) "
                       "-> (Tensor, Tensor, Tensor, float, int)",
    # 2:4 mma.sp decode kernel (csrc/sparse24/sparse24_mmasp.cu); CUDA
    "sparse24_mmasp_linear": "(Tensor x, Tensor a_frag, Tensor e_frag, int out_features, Tensor? bias, int warps, "
                             "int rows_per_warp, int splits) -> Tensor",
    "sparse24_mmasp_probe": "(Tensor a, Tensor b, Tensor e, int selector, bool bf16) -> Tensor",
    # the same kernel on 8-bit values with per-row scales (csrc/sparse24/sparse24_mmasp8.cu); CUDA
    "sparse24_mmasp8_linear": "(Tensor x, Tensor a_frag, Tensor e_frag, Tensor scale, int out_features, Tensor? bias, "
                              "int warps, int rows_per_warp, int splits) -> Tensor",
    # cuSPARSELt 2:4 matmul with cached plans (csrc/sparse24/sparse24_cusparselt.cpp); CUDA
    "sparse24_cslt_compress": "(Tensor weight, int layout=0) -> Tensor",
    "sparse24_cslt_linear": "(Tensor x, Tensor compressed, int out_features, Tensor? bias, int alg_id=-1, "
                            "int split_k=-1, int split_k_mode=-1, int split_k_buffers=-1, int layout=0) -> Tensor",
    "sparse24_cslt_search": "(Tensor x, Tensor compressed, int out_features, int layout=0) -> int[]",
    "sparse24_cslt_max_alg_id": "(Tensor x, Tensor compressed, int out_features, int layout=0) -> int",
    "sparse24_cslt_plan_count": "() -> int",
    # CUTLASS sm90 2:4 GEMM (csrc/sparse24/cutlass_sm90/); CUDA, sm_90a
    "sparse24_cutlass_compress": "(Tensor weight, int format=0) -> Tensor[]",
    "sparse24_cutlass_linear": "(Tensor x, Tensor values, Tensor meta, int out_features, Tensor? bias, "
                               "int config=0) -> Tensor",
}
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _fake(name: str):
    return torch.library.register_fake(f"{NAMESPACE}::{name}", lib=_lib)


@_fake("sparsegpt_add_batch")
def _(H, inp, nsamples):
    return nsamples + (inp.shape[0] if inp.dim() == 3 else 1)  # as the kernel counts batches


@_fake("sparsegpt_prune")
def _(weight, H, sparsity, prunen, prunem, blocksize, percdamp, max_retries, name, fast_inverse=False):
    rows = weight.shape[0]
    return (torch.empty_like(weight), torch.empty_like(weight, dtype=torch.bool),
            weight.new_empty(rows, dtype=torch.float32), 0.0, 0)


@_fake("sparse24_mmasp_linear")
def _(x, a_frag, e_frag, out_features, bias, warps, rows_per_warp, splits):
    return x.new_empty(x.shape[0], out_features)


@_fake("sparse24_mmasp8_linear")
def _(x, a_frag, e_frag, scale, out_features, bias, warps, rows_per_warp, splits):
    return x.new_empty(x.shape[0], out_features)


@_fake("sparse24_mmasp_probe")
def _(a, b, e, selector, bf16):
    return a.new_empty(32, 4, dtype=torch.float32)


@_fake("sparse24_cslt_compress")
def _(weight, layout=0):
    # The real size is library-defined; compile never traces compression (done when a module is prepared).
    return weight.new_empty(weight.numel() * weight.element_size() * 9 // 16, dtype=torch.uint8)


@_fake("sparse24_cslt_linear")
def _(x, compressed, out_features, bias=None, alg_id=-1, split_k=-1, split_k_mode=-1, split_k_buffers=-1, layout=0):
    return x.new_empty(x.shape[0], out_features)


@_fake("sparse24_cutlass_linear")
def _(x, values, meta, out_features, bias=None, config=0):
    return x.new_empty(x.shape[0], out_features)


# -- autograd: the packed weight is frozen, so every op's formula is dx = dy @ W, dbias = sum(dy) -----------
def _mmasp_setup(ctx, inputs, output) -> None:
    x, a_frag, e_frag, out_features, bias, *_ = inputs
    ctx.save_for_backward(a_frag, e_frag)
    ctx.shape = (out_features, x.shape[1])


def _mmasp_backward(ctx, grad):
    from llmprune_kernels.sparse24.backends.mmasp import MmaspLayout, from_mmasp_layout
    from llmprune_kernels.sparse24.pack import unpack_24

    a_frag, e_frag = ctx.saved_tensors
    gx, gb = linear_grads(grad, lambda: unpack_24(from_mmasp_layout(MmaspLayout(a_frag, e_frag, ctx.shape))),
                          ctx.needs_input_grad[0], ctx.needs_input_grad[4])
    return gx, None, None, None, gb, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::sparse24_mmasp_linear", _mmasp_backward, setup_context=_mmasp_setup,
                                lib=_lib)


# -- the Triton 2:4 decode kernel as an op: opaque to torch.compile, capturable in CUDA graphs ---------------
@torch.library.custom_op(f"{NAMESPACE}::sparse24_mm", mutates_args=())
def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                in_features: int) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the packed 2:4 weight ``(values, meta)`` through the Triton decode kernel."""
    from llmprune_kernels.sparse24.backends.decode import sparse24_mm as launch

    return launch(x, values, meta, bias, in_features)


@sparse24_mm.register_fake
def _(x, values, meta, bias, in_features):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _mm_setup(ctx, inputs, output) -> None:
    x, values, meta, bias, in_features = inputs
    ctx.save_for_backward(values, meta)
    ctx.in_features = in_features


def _mm_backward(ctx, grad):
    values, meta = ctx.saved_tensors
    gx, gb = linear_grads(grad, lambda: expand_24(values, meta, ctx.in_features), ctx.needs_input_grad[0],
                          ctx.needs_input_grad[3])
    return gx, None, None, gb, None


# torch.compile traces a backward whenever an input (e.g. the bias Parameter) requires grad.
sparse24_mm.register_autograd(_mm_backward, setup_context=_mm_setup)


# -- the Triton 8-bit 2:4 decode kernel (backend decode8) as an op, so compiled graphs read 8-bit weights ----
@torch.library.custom_op(f"{NAMESPACE}::sparse24_mm8", mutates_args=())
def sparse24_mm8(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, in_features: int, group_size: int) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the 8-bit 2:4 weight ``(values, meta, scale)`` (``group_size`` 0: one scale per
    output channel) through the Triton decode8 kernel."""
    from llmprune_kernels.sparse24.backends.decode8 import sparse24_q8_mm

    return sparse24_q8_mm(x, _q8(values, meta, scale, in_features, group_size), bias)


def _q8(values, meta, scale, in_features: int, group_size: int):
    from llmprune_kernels.sparse24.quant8 import Packed24Q8

    return Packed24Q8(values, meta, scale, (values.shape[0], in_features), group_size or None)


@sparse24_mm8.register_fake
def _(x, values, meta, scale, bias, in_features, group_size):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _mm8_setup(ctx, inputs, output) -> None:
    x, values, meta, scale, bias, in_features, group_size = inputs
    ctx.save_for_backward(values, meta, scale)
    ctx.in_features, ctx.group_size, ctx.dtype = in_features, group_size, x.dtype


def _mm8_backward(ctx, grad):
    from llmprune_kernels.sparse24.pack import unpack_24
    from llmprune_kernels.sparse24.quant8 import dequantize_24

    values, meta, scale = ctx.saved_tensors
    q = _q8(values, meta, scale, ctx.in_features, ctx.group_size)
    gx, gb = linear_grads(grad, lambda: unpack_24(dequantize_24(q, ctx.dtype)), ctx.needs_input_grad[0],
                          ctx.needs_input_grad[4])
    return gx, None, None, None, gb, None, None


sparse24_mm8.register_autograd(_mm8_backward, setup_context=_mm8_setup)
