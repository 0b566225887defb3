"""Why did the tuner time a CUTLASS config at M = 64 faster than the sweep then measured it?

In the seventh session's sweep, 11008x4096 bf16 at M = 64 ran 256x128x128 (1x2 cluster) at 0.0437 ms
(0.81x of dense) where tuning had timed it at 0.0319 ms (twice: search and re-timing). This times that
config, and its neighbours, on the same weights held three ways: the tuner's own compressed copies, a
SparseLinear's weight (values shared with the packed weight), and a SparseLinear call; each interleaved
with dense ``F.linear`` in CUDA graphs (medians of 15 trials). Prints one JSON line per case.
Usage: python benchmarks/diag_cutlass_small_m.py [out in dtype m]
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels.sparse24 import SparseLinear
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24 import dispatch
from llmprune_kernels.sparse24.pack import pack_24


def main() -> None:
    out_f, in_f = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (11008, 4096)
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
    ms = [int(sys.argv[4])] if len(sys.argv) > 4 else [64, 256, 2048]
    dense = [random_24_weight(out_f, in_f, dtype, "cuda")]
    n = dispatch.weight_copies(pack_24(dense[0]).nbytes(), "cuda")
    dense += [random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(n - 1)]
    own = {f: [ctl.compress(w, f) for w in dense] for f in ctl.FORMATS}
    mods = []
    for w in dense:
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        lin.weight.data = w
        mods.append(SparseLinear.from_linear(lin))
    names = ["256x128x128 cluster 1x2", "256x128x128 cluster 2x1", "128x128x64 cluster 2x1", "256x128x64 cluster 1x2"]
    for m in ms:
        x = torch.randn(m, in_f, device="cuda", dtype=dtype)
        dense_fns = [lambda w=w: F.linear(x, w) for w in dense]
        for name in names:
            cfg = ctl.TILES.index(name)
            f = ctl.format_of(cfg)
            groups = {
                "dense": dense_fns,
                "tuner_copies": [lambda w=w: ctl.linear(x, w, out_f, None, cfg) for w in own[f]],
                "module_weight": [lambda s=s: ctl.linear(x, s._cutlass(f), out_f, None, cfg) for s in mods],
            }
            with torch.no_grad():
                t = dict(zip(groups, dispatch.time_ms_interleaved(list(groups.values()), trials=15)))
                t1 = dispatch.time_ms([lambda w=w: ctl.linear(x, w, out_f, None, cfg) for w in own[f]], trials=3)
            shared = [s._cutlass(f).values.data_ptr() == s.values.data_ptr() for s in mods]
            print(json.dumps({"shape": [out_f, in_f], "dtype": str(dtype), "m": m, "tile": name, "copies": n,
                              "values_shared": shared, "ms": {k: round(v, 5) for k, v in t.items()},
                              "tuner_style_ms_3_trials": round(t1, 5),
                              "dense_over": {k: round(t["dense"] / v, 3) for k, v in t.items() if k != "dense"}}),
                  flush=True)


if __name__ == "__main__":
    main()
