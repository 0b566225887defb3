"""Which cuSPARSELt operand layout is fastest at large M, per dtype? (diagnostic for the bf16 gap)

Our op computes y[M, out] = x · Wᵀ with W, x and y row-major in memory; the ``layout`` argument (0..7, see
``csrc/sparse24/sparse24_cusparselt.cpp``) only changes how cuSPARSELt is told so: W as the structured A
operand (0..3) or as the structured B operand (4..7), each operand described row- or column-major. bf16 ran
20-50% slower than fp16 in layout 0 on the H100. Each layout runs in its own subprocess (a C++ error or an
illegal instruction in one must not take the others with it); within it, every case checks the result against
dense ``F.linear`` and times the library default and algorithm ids 0..MAX_ALG against dense in the same
process (CUDA graphs, ``dispatch.time_ms_interleaved``).

Run: python benchmarks/diag_cslt_layouts.py out.json   (env CSLT_LAYOUTS="0,4", CSLT_MS="2048,8192",
CSLT_MIN_ALG=0, CSLT_MAX_ALG=15, CSLT_DTYPES="float16,bfloat16"; several runs append to one out.json.jsonl
when CSLT_KEEP=1)
"""
import json
import os
import subprocess
import sys
import time

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def _child(layout: int, out_path: str) -> None:
    import torch
    import torch.nn.functional as F

    from llmprune_kernels.sparse24.backends import cusparselt as cslt
    from llmprune_kernels.sparse24.dispatch import random_24_weight, time_ms_interleaved

    ms = [int(v) for v in os.environ.get("CSLT_MS", "2048,8192").split(",")]
    max_alg = int(os.environ.get("CSLT_MAX_ALG", "15"))
    min_alg = int(os.environ.get("CSLT_MIN_ALG", "0"))
    dtypes = [getattr(torch, d) for d in os.environ.get("CSLT_DTYPES", "float16,bfloat16").split(",")]
    f = open(out_path, "a")  # noqa: SIM115 - appended to case by case, closed at exit
    for dtype in dtypes:
        for out_f, in_f in SHAPES:
            ws = [random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(2)]
            try:
                comp = [cslt.compress(w, layout) for w in ws]
            except Exception as exc:  # noqa: BLE001 - recorded, this layout cannot compress
                row = {"layout": layout, "dtype": str(dtype)[6:], "shape": [out_f, in_f], "error": repr(exc)[:300]}
                f.write(json.dumps(row) + "\n"); f.flush()
                continue
            for m in ms:
                row = {"layout": layout, "dtype": str(dtype)[6:], "shape": [out_f, in_f], "m": m}
                x = torch.randn(m, in_f, device="cuda", dtype=dtype)
                try:
                    y = cslt.linear(x, comp[0], out_f, None, cslt.DEFAULT_CONFIG, layout)
                    ref = F.linear(x.float(), ws[0].float())
                    row["max_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                    n_alg = min(cslt.max_alg_id(x, comp[0], out_f, layout), max_alg)
                    algs = list(range(min_alg, n_alg + 1))
                    row["max_alg_id"] = cslt.max_alg_id(x, comp[0], out_f, layout)
                    cfgs = [cslt.DEFAULT_CONFIG] + [cslt.CsltConfig(a) for a in algs]
                    groups = [[lambda w=w, x=x: F.linear(x, w) for w in ws]]
                    for cfg in cfgs:
                        groups.append([lambda c=c, g=cfg, x=x, o=out_f: cslt.linear(x, c, o, None, g, layout) for c in comp])
                    t = time_ms_interleaved(groups, reps=10, trials=5)
                    row["dense_ms"] = t[0]
                    row["default_ms"] = t[1]
                    row["alg_ms"] = {str(a): v for a, v in zip(algs, t[2:])}
                    best = min(range(1, len(t)), key=lambda i: t[i])
                    row["best_ms"] = t[best]
                    row["best_alg"] = -1 if best == 1 else algs[best - 2]
                    row["best_speedup"] = t[0] / t[best]
                except Exception as exc:  # noqa: BLE001 - recorded per case
                    row["error"] = repr(exc)[:300]
                print(json.dumps({k: v for k, v in row.items() if k != "alg_ms"}), flush=True)
                f.write(json.dumps(row) + "\n"); f.flush()


def main(out_path: str) -> None:
    import torch

    layouts = [int(v) for v in os.environ.get("CSLT_LAYOUTS", "0,1,2,3,4,5,6,7").split(",")]
    tmp = out_path + ".jsonl"
    if os.path.exists(tmp) and os.environ.get("CSLT_KEEP") != "1":
        os.remove(tmp)
    status = {}
    run_id = os.environ.get("CSLT_RUN", "")
    for layout in layouts:
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--child", str(layout), tmp], timeout=600, check=False)
        status[f"{run_id}{layout}"] = {"returncode": r.returncode, "seconds": round(time.time() - t0, 1)}
        print("layout", layout, status[f"{run_id}{layout}"], flush=True)
    rows = []
    if os.path.exists(tmp):
        with open(tmp) as f:
            rows = [json.loads(line) for line in f]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cusparselt_torch": torch.backends.cusparselt.version(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    summary = {}
    for r in rows:
        if "best_speedup" in r:
            key = f"{r['dtype']} {r['shape'][0]}x{r['shape'][1]} M={r['m']}"
            cell = summary.setdefault(key, {})
            if r["best_speedup"] > cell.get(r["layout"], {}).get("speedup", 0):
                cell[r["layout"]] = {"speedup": round(r["best_speedup"], 3), "alg": r["best_alg"]}
    with open(out_path + ".part", "w") as f:
        json.dump({"env": env, "method": __doc__.strip().splitlines()[0], "processes": status,
                   "best_speedup_by_layout": summary, "cases": rows}, f, indent=1)
    os.replace(out_path + ".part", out_path)
    for k, v in summary.items():
        print(k, v)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        _child(int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1])
