"""The Triton kernels compiled for sm_90 by Triton's CUDA backend, on the CPU (no GPU needed).

CI runs the kernels under the Triton interpreter, which accepts code the GPU compiler refuses (a global that is
not a constexpr, a cast the backend lacks). Here each kernel is compiled for an H100 target in a process without
``TRITON_INTERPRET``, in the variants its launchers use (split-K, swapped operands, bias, FP8 / INT8 values, the
scale modes), and a few properties of the PTX are checked. Skipped where Triton has no CUDA backend or ptxas.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmprune_kernels.sparse24.backends import _decode8_kernel as d8, _decode8_stream as d8s
from llmprune_kernels.sparse24.backends import _decode_dot as dd, _decode_stream as ds, _quant_act as qa

I = "i32"


def comp(fn, sig, const):
    sig = dict(sig, **dict.fromkeys(const, "constexpr"))
    try:
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    except triton.compiler.CompilationError:
        raise
    except Exception as exc:  # no CUDA backend or ptxas in this Triton
        print("SKIP", type(exc).__name__, exc)
        sys.exit(0)


def ints(*names):
    return dict.fromkeys(names, I)


n = 0
for fp8, code, x_ty, s_ty in [(True, 1, "*fp16", "*fp16"), (False, 2, "*bf16", "*u16"), (True, 0, "*fp32", "*fp32"),
                              (False, 1, "*fp16", "*fp16")]:
    k = comp(qa._quant_kernel, {"x_ptr": x_ty, "q_ptr": "*u8" if fp8 else "*i8", "s_ptr": s_ty,
                                **ints("M", "K", "ROWS", "stride_xm", "stride_qm")},
             {"FP8": fp8, "QMAX": 448.0 if fp8 else 127.0, "SCALE": code, "TINY": 6.1e-5, "SMAX": 127.9375,
              "BLOCK_M": 4, "BLOCK_K": 1024})
    assert "div.rn.f32" in k.asm["ptx"], "activation quantisation: the division is not IEEE"
    n += 1
for swap, split, bias, ieee, pairs, xt in [(0, 1, 1, 0, 0, "*fp16"), (1, 2, 0, 0, 1, "*fp16"),
                                          (0, 2, 1, 1, 0, "*bf16"), (1, 1, 1, 0, 0, "*bf16")]:
    k = comp(dd._sparse24_mm_kernel, {"x_ptr": xt, "v_ptr": "*i32" if pairs else xt, "m_ptr": "*u8", "b_ptr": xt,
                                      "y_ptr": xt if split == 1 else "*fp32",
                                      **ints("M", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_vn", "stride_mn",
                                             "stride_ym", "stride_ys")},
             dict(HAS_BIAS=bool(bias), IEEE=bool(ieee), SPLIT_K=split, PAIRS=bool(pairs), SWAP=bool(swap),
                  BLOCK_M=16, BLOCK_N=32 if swap else 64, BLOCK_K=64))
    assert ieee or "mma" in k.asm["ptx"], "16-bit decode: no tensor-core instruction"
    n += 1
for swap, split, bias, fp8, mode, xt in [(0, 1, 1, 1, 0, "*fp16"), (1, 2, 0, 0, 1, "*bf16"), (1, 1, 1, 1, 2, "*fp16"),
                                        (0, 3, 0, 0, 0, "*bf16")]:
    k = comp(d8._sparse24_q8_kernel, {"x_ptr": xt, "v_ptr": "*u8" if fp8 else "*i8", "m_ptr": "*u8",
                                      "s_ptr": "*fp32", "b_ptr": xt, "y_ptr": xt if split == 1 else "*fp32",
                                      **ints("M", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_vn", "stride_mn",
                                             "stride_sn", "stride_ym", "stride_ys")},
             dict(HAS_BIAS=bool(bias), IEEE=False, SPLIT_K=split, SWAP=bool(swap), FP8=bool(fp8), SCALE_MODE=mode,
                  GROUP=12 if mode == 2 else 64, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64))
    assert "mma" in k.asm["ptx"], "8-bit decode: no tensor-core instruction"
    n += 1
for split, bias, expand, acc3 in [(1, 1, 0, 1), (2, 0, 1, 0)]:
    comp(ds._sparse24_stream_kernel, {"x_ptr": "*fp16", "w_ptr": "*i32", "m_ptr": "*u8", "b_ptr": "*fp16",
                                      "y_ptr": "*fp16" if split == 1 else "*fp32",
                                      **ints("M", "N", "G", "G_PER_SPLIT", "stride_xm", "stride_wn", "stride_mn",
                                             "stride_ym", "stride_ys")},
         dict(HAS_BIAS=bool(bias), SPLIT_K=split, EXPAND=bool(expand), ACC3=bool(acc3), BLOCK_M=2, BLOCK_N=64,
              BLOCK_G=32))
    n += 1
for split, bias, fp8, asm, acc3 in [(1, 1, 1, 1, 1), (2, 0, 0, 0, 0), (1, 0, 1, 0, 1)]:
    k = comp(d8s._sparse24_q8_stream_kernel, {"x_ptr": "*fp16", "w_ptr": "*i32", "m_ptr": "*u8", "s_ptr": "*fp32",
                                              "b_ptr": "*fp16", "y_ptr": "*fp16" if split == 1 else "*fp32",
                                              **ints("M", "N", "K", "Q", "Q_PER_SPLIT", "stride_xm", "stride_wn",
                                                     "stride_mn", "stride_sn", "stride_ym", "stride_ys"),
                                              "POST": "fp32"},
             dict(HAS_BIAS=bool(bias), SPLIT_K=split, FP8=bool(fp8), ASM=bool(asm), ACC3=bool(acc3), BLOCK_M=2,
                  BLOCK_N=64, BLOCK_Q=16))
    assert not asm or "e4m3x2" in k.asm["ptx"], "8-bit streaming decode: no hardware FP8 conversion"
    n += 1
print("OK", n)
'''


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.strip().startswith("OK"), out.stdout[-2000:]
