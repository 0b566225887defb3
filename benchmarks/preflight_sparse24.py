"""GPU preflight of one decode-kernel kind, in its own process: every tuning candidate of that kind at a
LLaMA-7B shape and a few-row shape, fp16 and bf16, against the reference.

A kernel fault (e.g. an illegal address) poisons the whole CUDA context, so run_sparse24_gpu.sh runs one
process per kind first and restricts tuning to the kinds that passed (``LLMPRUNE_SPARSE24_KINDS``).
Exit status 0 = every config of the kind ran and matched. Usage: python benchmarks/preflight_sparse24.py 2
"""
from __future__ import annotations

import sys
import time

import torch

from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.reference.sparse24_matmul import sparse24_linear_reference
from llmprune_kernels.testing import random_24_weight
from llmprune_kernels.sparse24.pack import pack_24

TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def main(kind: int) -> int:
    bad, t0 = [], time.time()
    configs = [c for c in s24.DOT_CONFIGS + s24.SWAP_CONFIGS + s24.STREAM_CONFIGS if c[-1] == kind]
    if kind == s24.KIND_EXPAND:  # not a tuning candidate; checked with stream tiles
        configs = [c[:-1] + (kind,) for c in s24.STREAM_CONFIGS[:2]]
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((4096, 4096), (576, 1536)):
            p = pack_24(random_24_weight(n, k, dtype, "cuda"))
            for m in (1, 3, 16) if kind in (s24.KIND_DOT, s24.KIND_DOT_SWAP) else (1, 2):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = sparse24_linear_reference(x.double(), p.to(torch.float64))
                for cfg in configs:
                    try:
                        y = s24.sparse24_mm(x, p.values, p.meta, None, k, block=cfg)
                        torch.cuda.synchronize()
                        err = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0))
                    except Exception as exc:  # noqa: BLE001 - report every failure
                        bad.append(f"{s24.config_name(cfg)} {dtype} {n}x{k} M={m}: {type(exc).__name__}: {exc}"[:300])
                        if "CUDA" in str(exc) or "cuda" in type(exc).__name__.lower():
                            break  # the context may be gone: stop here
                        continue
                    if not err <= TOL[dtype]:
                        bad.append(f"{s24.config_name(cfg)} {dtype} {n}x{k} M={m}: relative error {err:.3g}")
    print(f"preflight kind {kind} ({s24.KIND_NAMES[kind]}): {len(configs)} configs, "
          f"{'OK' if not bad else 'FAILED'} in {time.time() - t0:.0f}s")
    for b in bad[:20]:
        print("  ", b)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
