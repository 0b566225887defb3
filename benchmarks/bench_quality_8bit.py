"""Quality of 8-bit 2:4: held-out perplexity of SmolLM2-135M (the embedded GGUF) pruned 2:4 by SparseGPT, with the
same masks stored as 16-bit values and as FP8 e4m3 / INT8 values (``sparsify_`` with
``SemiSparseWeightConfig(weight_dtype=..., group_size=...)``), and with the activations quantised per token too.

    python benchmarks/bench_quality_8bit.py [--device cpu] [--nsamples 64] [--seqlen 512] [--eval-windows 0]
                                            [--out benchmarks/results/quality_8bit_smollm2]

Rows (one pruning; every row evaluates the same held-out windows):

* ``fp16-2:4``: the pruned model with its 2:4 weights rounded to fp16 (the values every 8-bit row quantises);
* ``fp8-pc`` / ``int8-pc``: 8-bit values, one scale per output channel; ``fp8-g128`` / ``int8-g128``: one scale per
  128 input columns;
* ``fp8-pc-a8`` / ``int8-pc-a8``: per-channel 8-bit weights and every Linear's activations quantised per token to
  the same 8-bit type (scales rounded up to fp16, as the fp16 ``cslt8`` path does), computed by
  ``reference.sparse24_8bit.sparse24_8bit_act_linear_reference`` for every call. On a GPU ``cslt8`` runs only
  above M = 16 where tuning measured it faster, so this row is its worst case (every token quantised);
* ``fp8-pc-obs`` / ``int8-pc-obs``: a second SparseGPT 2:4 run with ``quantize="fp8"`` / ``"int8"`` (each Linear's
  kept weights rounded with the OBS error compensation over its mask, ``reference.quant_obs``), then ``sparsify_``
  with the same 8-bit type and per-channel scales. Each Linear's mask is compared with the ``fp16-2:4`` run's
  (``mask``: Linears with the same pruned set, entries that differ; kept weights that rounded to the grid's 0 are
  not counted as differences). Later decoder layers are calibrated on the outputs of the quantised earlier ones,
  so their masks may differ; the first layer's may not;
* ``fp8-pc-obs-fixed`` / ``int8-pc-obs-fixed``: the ``fp16-2:4`` row's weights rounded by ``quantize_obs`` over that
  run's masks, with the Hessian and damping each Linear was pruned with (recorded during that run): the rounding's
  effect alone, at exactly the same masks.

``--only KEY,...`` runs ``fp16-2:4`` and the named rows, and keeps the other rows of an existing ``<out>.json``
with the same settings.

On a CPU ``SparseLinear8`` runs the reference (the dequantised weight in ``F.linear``) in the module's dtype: the
GGUF loads as float32, so every row computes in float32 there; the weights' values are what differ. ``delta_pct``
is each row's perplexity relative to ``fp16-2:4``. Writes ``<out>.json`` (numbers, settings, versions, host,
date) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from llmprune_kernels import SemiSparseWeightConfig, SparsityConfig, sparsify_
from llmprune_kernels.pipeline import data as D
from llmprune_kernels.pipeline import prune_model
from llmprune_kernels.pipeline.evaluate import perplexity
from llmprune_kernels.pipeline.models import load_model, model_display_name
from llmprune_kernels.methods.sparsegpt import SparseGPTPruner
from llmprune_kernels.pipeline.report import host, versions, write_json
from llmprune_kernels.reference.quant_obs import quantize_obs
from llmprune_kernels.reference.sparse24_8bit import sparse24_8bit_act_linear_reference
from llmprune_kernels.sparse24.linear import _is_24
from llmprune_kernels.sparse24.linear8 import SparseLinear8

RESULTS = Path(__file__).resolve().parent / "results"
# (key, weight_dtype, group_size, 8-bit activations)
ROWS = [("fp8-pc", "fp8", None, False), ("int8-pc", "int8", None, False), ("fp8-g128", "fp8", 128, False),
        ("int8-g128", "int8", 128, False), ("fp8-pc-a8", "fp8", None, True), ("int8-pc-a8", "int8", None, True)]
OBS_ROWS = [("fp8-pc-obs", "fp8"), ("int8-pc-obs", "int8")]  # (key, SparseGPT quantize = weight_dtype)
FIXED_ROWS = [("fp8-pc-obs-fixed", "fp8"), ("int8-pc-obs-fixed", "int8")]  # the fp16-2:4 run's masks and Hessians


def _pick(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and _is_24(module.weight)


def _act8(module: SparseLinear8) -> None:
    """Every call of ``module`` through the 8-bit-activation reference (fp16 activation scales)."""
    def forward(x, m=module):
        return sparse24_8bit_act_linear_reference(x, m.quantized(), m.bias, torch.float16).to(x.dtype)
    module.forward = forward


def _zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f: m.weight.detach() == 0 for f, m in model.named_modules() if _pick(m, f)}


def _compare_masks(base: dict[str, torch.Tensor], zeros: dict[str, torch.Tensor], grid_zeros: dict[str, int],
                   first_layer: str) -> dict:
    """Per Linear: the same pruned set as ``base`` when ``base``'s zeros are zeros here and the only extra zeros
    are the kept weights the pruner reported as rounded to 0."""
    same, differ, first_same = 0, 0, True
    for fqn, b in base.items():
        z = zeros[fqn]
        n = int((b ^ z).sum()) - grid_zeros.get(fqn, 0)
        ok = bool((b & ~z).sum() == 0) and n == 0
        same += ok
        differ += max(n, 0) + int((b & ~z).sum())
        if fqn.startswith(first_layer):
            first_same &= ok
    total = sum(b.numel() for b in base.values())
    return {"linears_same": same, "linears": len(base), "entries_differ_pct": 100 * differ / total,
            "first_layer_same": first_same,
            "kept_rounded_to_zero": sum(grid_zeros.values())}


@contextlib.contextmanager
def _recording(store: dict | None):
    """While active (``store`` not None), every SparseGPT prune also stores its Linear's Hessian (on the CPU),
    damping and mask under the Linear's name; the pruning itself is unchanged."""
    if store is None:
        yield
        return
    plain = SparseGPTPruner.prune

    def prune(self):
        H = self.finalized_statistic().detach().to("cpu", copy=True)
        report = plain(self)
        store[self.layer_name] = (H, report["sparsegpt_damp"], self.layer.weight.detach().cpu() == 0)
        return report

    SparseGPTPruner.prune = prune
    try:
        yield
    finally:
        SparseGPTPruner.prune = plain


def _quantize_fixed(model: nn.Module, store: dict, wd: str) -> float:
    """Round every recorded Linear of ``model`` with ``quantize_obs`` over its recorded mask; the summed loss."""
    loss = 0.0
    for fqn, lin in [(f, m) for f, m in model.named_modules() if _pick(m, f)]:
        H, damp, mask = store[fqn]
        q = quantize_obs(lin.weight.detach(), H.to(lin.weight.device), mask.to(lin.weight.device), wd, damp=damp,
                         name=fqn)
        lin.weight.data.copy_(q.weight)
        loss += q.loss
    return loss


def _merge_existing(result: dict, path: Path) -> None:
    """Rows of an earlier run with the same settings (``--only``)."""
    import json
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == result["settings"]:
            result["rows"].update(old.get("rows", {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows; 0 = all")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated row keys (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "quality_8bit_smollm2"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in ("device", "nsamples", "seqlen", "eval_windows", "seed", "batch_size")}
    model, tok = load_model(None)
    text = D.load_text(None, None)
    calib = D.calibration_windows(D.tokenize(tok, text.calibration, "calibration text"), args.nsamples, args.seqlen,
                                  args.seed)
    eval_ids = D.eval_windows(D.tokenize(tok, text.evaluation, "evaluation text"), args.seqlen,
                             args.eval_windows or None)
    result = {"model": model_display_name(None), "method": "sparsegpt", "sparsity": "2:4", "settings": settings,
              "text_source": text.source, "eval_windows": int(eval_ids.shape[0]),
              "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "host": host(), "rows": {}}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import env_info

    result["env"] = env_info()
    ev = dict(device=args.device, batch_size=args.batch_size)
    wanted = set(args.only.split(",")) if args.only else None
    if wanted:
        _merge_existing(result, out.with_suffix(".json"))
    pristine = copy.deepcopy(model) if any(not wanted or k in wanted for k, _ in OBS_ROWS) else None
    prune = dict(device=args.device, batch_size=args.batch_size, measure_error=False, progress=False)
    store = {} if any(not wanted or k in wanted for k, _ in FIXED_ROWS) else None
    t0 = time.perf_counter()
    with _recording(store):
        prune_model(model, calib, "sparsegpt", SparsityConfig.parse(pattern="2:4"), **prune)
    result["prune_seconds"] = round(time.perf_counter() - t0, 1)
    base_zeros = _zeros(model)
    with torch.no_grad():  # the 16-bit checkpoint's values: what the 8-bit rows quantise
        for _, lin in [(f, m) for f, m in model.named_modules() if _pick(m, f)]:
            lin.weight.copy_(lin.weight.half().float())
    t0 = time.perf_counter()
    base = perplexity(model, eval_ids, **ev)
    result["rows"]["fp16-2:4"] = {"perplexity": base, "delta_pct": 0.0,
                                  "eval_seconds": round(time.perf_counter() - t0, 1)}
    print(f"fp16-2:4: {base:.4f}", flush=True)
    for key, wd, group, act8 in ROWS:
        if wanted and key not in wanted:
            continue
        m8 = sparsify_(copy.deepcopy(model), SemiSparseWeightConfig(weight_dtype=wd, group_size=group), _pick)
        if act8:
            for mod in m8.modules():
                if isinstance(mod, SparseLinear8):
                    _act8(mod)
        t0 = time.perf_counter()
        ppl = perplexity(m8, eval_ids, **ev)
        result["rows"][key] = {"perplexity": ppl, "delta_pct": 100 * (ppl / base - 1), "weight_dtype": wd,
                               "group_size": group, "activations": "8bit" if act8 else "16bit",
                               "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(f"{key}: {ppl:.4f} ({result['rows'][key]['delta_pct']:+.3f}%)", flush=True)
        write_json(result, out.with_suffix(".json"))
        write_markdown(result, out.with_suffix(".md"))
        del m8
    for key, wd in OBS_ROWS:
        if wanted and key not in wanted:
            continue
        mq = copy.deepcopy(pristine)
        t0 = time.perf_counter()
        pr = prune_model(mq, calib, "sparsegpt", SparsityConfig.parse(pattern="2:4"), options={"quantize": wd}, **prune)
        seconds = round(time.perf_counter() - t0, 1)
        grid_zeros = {st.name: int(st.extra.get("sparsegpt_quant_zeros", 0)) for st in pr.linears}
        first = next(iter(base_zeros)).split(".mlp.")[0].split(".self_attn.")[0] + "."
        masks = _compare_masks(base_zeros, _zeros(mq), grid_zeros, first)
        m8 = sparsify_(mq, SemiSparseWeightConfig(weight_dtype=wd), _pick)
        t0 = time.perf_counter()
        ppl = perplexity(m8, eval_ids, **ev)
        result["rows"][key] = {"perplexity": ppl, "delta_pct": 100 * (ppl / base - 1), "weight_dtype": wd,
                               "group_size": None, "activations": "16bit", "rounding": "obs", "mask": masks,
                               "quant_loss": sum(st.extra.get("sparsegpt_quant_loss", 0.0) for st in pr.linears),
                               "prune_seconds": seconds, "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(f"{key}: {ppl:.4f} ({result['rows'][key]['delta_pct']:+.3f}%), mask {masks}", flush=True)
        write_json(result, out.with_suffix(".json"))
        write_markdown(result, out.with_suffix(".md"))
        del m8, mq
    for key, wd in FIXED_ROWS:
        if wanted and key not in wanted:
            continue
        mq = copy.deepcopy(model)  # the fp16-2:4 row's weights
        t0 = time.perf_counter()
        loss = _quantize_fixed(mq, store, wd)
        seconds = round(time.perf_counter() - t0, 1)
        m8 = sparsify_(mq, SemiSparseWeightConfig(weight_dtype=wd), _pick)
        t0 = time.perf_counter()
        ppl = perplexity(m8, eval_ids, **ev)
        result["rows"][key] = {"perplexity": ppl, "delta_pct": 100 * (ppl / base - 1), "weight_dtype": wd,
                               "group_size": None, "activations": "16bit", "rounding": "obs", "quant_loss": loss,
                               "quant_seconds": seconds, "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(f"{key}: {ppl:.4f} ({result['rows'][key]['delta_pct']:+.3f}%)", flush=True)
        write_json(result, out.with_suffix(".json"))
        write_markdown(result, out.with_suffix(".md"))
        del m8, mq
    write_json(result, out.with_suffix(".json"))
    write_markdown(result, out.with_suffix(".md"))
    return 0


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [f"# 8-bit 2:4 perplexity, {result['model']} (SparseGPT 2:4)", "",
             f"Calibration {s['nsamples']} x {s['seqlen']} tokens (seed {s['seed']}), evaluation "
             f"{result['eval_windows']} x {s['seqlen']} held-out tokens ({result['text_source']}); device "
             f"{s['device']}, compute dtype {result['compute_dtype']}; {result['date']}.", "",
             "| row | weights | scales | rounding | activations | perplexity | vs fp16 2:4 |",
             "|---|---|---|---|---|---:|---:|"]
    notes = []
    for key, r in result["rows"].items():
        wd = r.get("weight_dtype", "fp16")
        scales = "-" if wd == "fp16" else ("per channel" if r["group_size"] is None else f"per {r['group_size']}")
        rounding = "-" if wd == "fp16" else ("OBS" if r.get("rounding") == "obs" else "nearest")
        lines.append(f"| {key} | {wd} | {scales} | {rounding} | {r.get('activations', '16bit')} | "
                     f"{r['perplexity']:.4f} | {r['delta_pct']:+.3f}% |")
        if "mask" in r:
            m = r["mask"]
            notes.append(f"- {key}: {m['linears_same']} of {m['linears']} Linears have the fp16-2:4 run's mask "
                         f"(first decoder layer: {'all' if m['first_layer_same'] else 'not all'}); "
                         f"{m['entries_differ_pct']:.3f}% of the entries differ; {m['kept_rounded_to_zero']} kept "
                         f"weights rounded to 0. SparseGPT + rounding: {r['prune_seconds']:.0f} s.")
    if notes:
        lines += ["", "`-obs` rows: a SparseGPT run with `quantize` (later layers calibrated on the quantised earlier "
                      "ones), compared with the fp16-2:4 run's masks:", ""] + notes
    if any(k.endswith("-obs-fixed") for k in result["rows"]):
        lines += ["", "`-obs-fixed` rows: the fp16-2:4 row's weights rounded by `reference.quant_obs.quantize_obs` "
                      "over that run's masks, with the Hessian and damping each Linear was pruned with (the same "
                      "masks exactly)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
