"""Which cuSPARSELt operand layout is fastest at large M, per dtype? (diagnostic for the bf16 gap)

Our op computes y[M, out] as D = W_sparse · x^T with x row-major and D column-major. torch's
``_cslt_sparse_mm`` picks operand orders from strides and ``transpose_result``; its variants show whether
another layout gets faster library kernels (bf16 ran 20-50% slower than fp16 in our layout on the H100).
All times are CUDA-graph medians (dispatch.time_ms) in one process, dense ``F.linear`` alongside.

Run: python benchmarks/diag_cslt_layouts.py [out.json]
"""
import json
import sys

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24 import cusparselt as cslt
from llmprune_kernels.sparse24.dispatch import random_24_weight, time_ms

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [2048, 8192]


def main(out_path: str | None) -> None:
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in SHAPES:
            ws = [random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(2)]
            ours = [cslt.compress(w) for w in ws]
            theirs = [torch._cslt_compress(w) for w in ws]
            for m in MS:
                x = torch.randn(m, in_f, device="cuda", dtype=dtype)
                xt_col, xt_row = x.t(), x.t().contiguous()
                row = {"dtype": str(dtype).removeprefix("torch."), "shape": [out_f, in_f], "m": m}
                t = row["ms"] = {"dense": time_ms([lambda w=w: F.linear(x, w) for w in ws])}
                t["ours_default"] = time_ms([lambda c=c: cslt.linear(x, c, out_f) for c in ours])
                cfg = cslt.library_search(x, ours[0], out_f)
                row["ours_search_config"] = cfg.as_dict()
                t["ours_search"] = time_ms([lambda c=c: cslt.linear(x, c, out_f, None, cfg) for c in ours])
                for name, b in (("torch_Bcol", xt_col), ("torch_Brow", xt_row)):
                    for tr in (False, True):
                        key = f"{name}_T{int(tr)}"
                        try:
                            alg = torch._cslt_sparse_mm_search(theirs[0], b, transpose_result=tr)
                            t[key] = time_ms([lambda c=c: torch._cslt_sparse_mm(c, b, transpose_result=tr, alg_id=alg)
                                              for c in theirs])
                            row[key + "_alg"] = int(alg)
                        except Exception as exc:  # record why this layout cannot run
                            t[key] = None
                            row[key + "_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                best = min((k for k in t if k != "dense" and t[k] is not None), key=lambda k: t[k])
                row["best"], row["best_speedup"] = best, t["dense"] / t[best]
                print(row["dtype"], row["shape"], m, {k: (round(v * 1e3, 1) if v else None) for k, v in t.items()},
                      "best", best, round(row["best_speedup"], 2), flush=True)
                rows.append(row)
    if out_path:
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cusparselt_torch": torch.backends.cusparselt.version()}
        with open(out_path, "w") as f:
            json.dump({"env": env, "method": __doc__.strip().splitlines()[0], "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
