"""End to end: a LLaMA-7B-shaped model (random weights, pruned 2:4), dense vs SparseLinear, one process.

``--mode eager``: prefill time of a 2048-token prompt and greedy decode tokens/s with ``generate``
(eager PyTorch, so the decode loop is bound by Python/launch overhead on both sides).
``--mode graph``: greedy decode with a static KV cache, one CUDA graph per step (kernel time).
Both models hold identical weights; the sparse one is ``sparsify_``-ed with the tuning table the linear
benchmark saved (so nothing is measured twice). Figures are merged into the results JSON under "e2e".
Usage: python benchmarks/e2e_sparse24.py --mode eager --layers 8 --table T.json --results R.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn as nn

from llmprune_kernels.sparse24 import SparseLinear, sparsify_
from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24 import dispatch


def build(layers: int, dtype=torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    with torch.no_grad():
        for mod in model.model.layers.modules():
            if isinstance(mod, nn.Linear):
                g = mod.weight.data.view(-1, 4)  # magnitude 2:4: zero the 2 smallest |w| of each group
                g.scatter_(1, g.abs().argsort(dim=1)[:, :2], 0)
    return model, cfg


def decode_graph(model, cfg, prompt, n_new):
    """Seconds per greedy token with a static KV cache, each step one CUDA-graph replay."""
    from transformers import StaticCache

    p = prompt.shape[1]
    cache = StaticCache(config=cfg, max_cache_len=p + n_new + 8)
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device="cuda"),
                       use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        pos = torch.tensor([p], device="cuda")

        def step():
            out = model(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                        use_cache=True).logits
            return out[:, -1:].argmax(-1)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nxt = step()
        toks = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_new):
            g.replay()
            tok.copy_(nxt)
            pos.add_(1)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n_new
        toks.append(int(tok))
    return dt


def nbytes(mods, names):
    return sum(getattr(m, n).numel() * getattr(m, n).element_size() for m in mods for n in names if getattr(m, n, None) is not None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "graph"], required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--table", default=None)
    ap.add_argument("--results", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dense-tolerance", type=float, default=0.0,
                    help="sparsify_'s dense_tolerance (memory-lean dispatch); results go under '<mode>_lean'")
    a = ap.parse_args()
    dense, cfg = build(a.layers)
    sparse = copy.deepcopy(dense)
    t0 = time.perf_counter()
    table = a.table if a.table and os.path.exists(a.table) else None
    sparsify_(sparse, table=table, dense_tolerance=a.dense_tolerance)
    res = {"layers": a.layers, "dtype": "float16", "hidden": 4096, "intermediate": 11008, "vocab": 32000,
           "sparsify_s": time.perf_counter() - t0, "table_loaded": table is not None,
           "dense_tolerance": a.dense_tolerance}
    sl = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    res["n_sparse_linears"] = len(sl)
    res["dispatch"] = {}  # per weight shape: the path (and decode kernel) at decode and prefill sizes
    for mod in sl:
        key = dispatch.shape_key(mod.out_features, mod.in_features, mod.values.dtype)
        res["dispatch"][key] = {str(mm): (c.path + (f" ({s24.config_name(c.decode)})" if c.decode and c.path == "decode"
                                                    else f" {list(c.mmasp)}" if c.mmasp and c.path == "mmasp" else "")) for mm in (1, 2048) for c in [mod.choose(mm)]}
    res["linear_weight_bytes_dense"] = sum(m.weight.numel() * 2 for m in dense.model.layers.modules()
                                           if isinstance(m, nn.Linear))
    res["linear_state_bytes_sparse"] = nbytes(sl, ["values", "meta"])
    def cache_bytes(m, t) -> int:
        """Bytes a cache entry adds: tensors (dense / cuSPARSELt copies), objects with nbytes() (mma.sp
        layout); a CUTLASS weight's values count only when they are not the module's packed values."""
        if isinstance(t, torch.Tensor):
            return t.nbytes
        if isinstance(t, ctl.CutlassWeight):
            shared = t.values.data_ptr() == m.values.data_ptr()
            return t.meta.nbytes + (0 if shared else t.values.nbytes)
        return t.nbytes()

    res["linear_cache_bytes_sparse"] = sum(cache_bytes(m, t) for m in sl for t in m._cache.values())
    res["linear_cache_bytes_sparse_by_kind"] = {
        kind: sum(cache_bytes(m, t) for m in sl for k, t in m._cache.items() if k == kind)
        for kind in sorted({k for m in sl for k in m._cache})}
    res["cutlass_values_shared_with_packed"] = sorted({t.values.data_ptr() == m.values.data_ptr() for m in sl
                                                       for t in m._cache.values() if isinstance(t, ctl.CutlassWeight)})
    prompt = torch.randint(0, 32000, (1, 2048), device="cuda")
    short = prompt[:, :128]
    n = a.new_tokens
    with torch.no_grad():
        for name, model in (("dense", dense), ("sparse", sparse)):
            if a.mode == "eager":
                res[f"prefill_2048_ms_{name}"] = dispatch.time_ms([lambda m=model: m(prompt, logits_to_keep=1)],
                                                                  graph=False, reps=3, trials=3)
                res[f"_logits_{name}"] = model(prompt, logits_to_keep=1).logits.float()
                model.generate(short, max_new_tokens=4, do_sample=False)
                rates = []
                for _ in range(2):  # two timed runs: the first one has shown one-off slowness
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                    torch.cuda.synchronize()
                    rates.append(n / (time.perf_counter() - t0))
                res[f"decode_eager_tok_s_{name}"] = max(rates)
                res[f"decode_eager_tok_s_runs_{name}"] = rates
                res[f"_tokens_{name}"] = out[0, 128:].tolist()
            else:
                res[f"decode_graph_tok_s_{name}"] = 1.0 / decode_graph(model, cfg, short, n)
    if a.mode == "eager":
        res["prefill_speedup"] = res["prefill_2048_ms_dense"] / res["prefill_2048_ms_sparse"]
        res["decode_eager_speedup"] = res["decode_eager_tok_s_sparse"] / res["decode_eager_tok_s_dense"]
        td, ts = res.pop("_tokens_dense"), res.pop("_tokens_sparse")
        res["greedy_tokens_agree_fraction"] = sum(x == y for x, y in zip(td, ts)) / n
        ld, ls = res.pop("_logits_dense"), res.pop("_logits_sparse")
        # Random weights give near-flat logits, so greedy tokens can diverge on rounding; the logits
        # themselves show whether sparse and dense compute the same function.
        res["prefill_last_logits_max_rel_diff"] = float((ld - ls).abs().max() / ld.abs().max())
        res["prefill_last_logits_top1_equal"] = bool(ld.argmax() == ls.argmax())
    else:
        res["decode_graph_speedup"] = res["decode_graph_tok_s_sparse"] / res["decode_graph_tok_s_dense"]
    print(json.dumps(res, indent=1))
    data = json.load(open(a.results)) if os.path.exists(a.results) else {}
    data.setdefault("e2e", {}).update({a.mode + ("_lean" if a.dense_tolerance > 0 else ""): res})
    tmp = a.results + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, a.results)


if __name__ == "__main__":
    main()
