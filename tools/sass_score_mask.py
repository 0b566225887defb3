"""Static cost of the unstructured score-and-mask selections on sm_90, without a GPU: compile for Hopper, read the SASS.

Each select (``hist``, the default, and ``radix1``; fp16, Wanda, bool mask written, as the benchmark's ``kernel``
figure) is compiled with exactly the launch parameters of ``score_mask._rows_config`` for the LLaMA row widths
4096, 11008 and 28672. Reported: registers, spill (stack) bytes and STL/LDL count, shared memory, SASS
instruction count, SHFL / REDUX / BAR counts, the loops left in the code, and an estimate of the
warp-instructions issued per row on the common path: every instruction once (loops times their trip count from
the source's ``range(N)``, or for a while loop the ``# expected trips: N`` its line states), except the
divergence handlers after the kernel's body and the rare branches (radix1: odd tiles with Inf/NaN/subnormal
scores, bucket overflow; hist: levels past the second, the ranked tie path and k = 0), attributed through the
line table (``nvdisasm -gi``); times the warps of a row. A copy of the same bytes (the benchmark's copy-floor
kernel, ``benchmarks/conftest.py``) is costed the same way. ``issue_bound_ms``: those instructions at the H100
SXM's peak issue rate (132 SMs x 4 schedulers x 1.98 GHz), a lower bound that ignores the latency of the
dependent reduction chain; where ``benchmarks/results/score_mask.json`` holds measured times, they are set
beside it. Writes ``benchmarks/results/sass_score_mask.json`` (or ``--out``). Run:
``python tools/sass_score_mask.py`` (needs Triton's bundled CUDA tools; a few minutes on a CPU).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import inspect
import json
import os
import re
import sys

import triton

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(REPO, "benchmarks"))
import sass_tools as st  # noqa: E402
from conftest import COPY_BLOCK as CF_BLOCK, COPY_WARPS as CF_WARPS, copy_floor_kernel  # noqa: E402

from llmprune_kernels.ops import score_mask as sm  # noqa: E402
from llmprune_kernels.ops import score_mask_hist, score_mask_hist_smem, score_mask_radix  # noqa: E402

ISSUE_PER_MS = 132 * 4 * 1.98e9 / 1e3  # warp-instructions per ms at peak issue (H100 SXM, boost clock)
TYPES = dict(w_ptr="*fp16", g_ptr="*fp16", f_ptr="*fp32", cs_ptr="*fp16", rs_ptr="*fp16", mask_ptr="*u8",
             bits_ptr="*u8", scratch_ptr="*i32", n_rows="i32", n_cols="i32", k="i32", stride_w="i32",
             stride_g="i32", stride_m="i32", stride_b="i32")
FLAGS = dict(MODE=0, GPROMO=0, WRITE_MASK=True, WRITE_BITS=False, ZERO_W=False)  # Wanda, bool mask only
SHAPES = {4096: [(4096, 4096), (11008, 4096)], 11008: [(4096, 11008)], 28672: [(8192, 28672)]}
MEASURED = os.path.join(REPO, "benchmarks", "results", "score_mask.json")


def _src(mod):
    return os.path.basename(mod.__file__), inspect.getsource(mod).splitlines()


def _lines(mod, text: str) -> set:
    """(file, line) of every line of ``mod`` containing ``text``."""
    name, src = _src(mod)
    return {(name, i + 1) for i, ln in enumerate(src) if text in ln}


def _span(mod, start: str, stop: str, after: str = "") -> set:
    """(file, line) from the first line containing ``start`` (after one containing ``after``) to ``stop``."""
    name, src = _src(mod)
    i = next(i for i, ln in enumerate(src) if after in ln) if after else 0
    hit = (lambda ln: ln.startswith(start)) if start[:1].isspace() else (lambda ln: start in ln)  # indent matters
    a = next(j for j in range(i, len(src)) if hit(src[j]))
    b = next(j for j in range(a, len(src)) if stop in src[j])
    return {(name, j + 1) for j in range(a, b + 1)}


def rare_lines(kernel, consts: dict) -> set:
    """Source lines (at the kernel's level or one call deep) whose instructions run only on rare rows."""
    r = score_mask_radix
    if kernel is sm._rows_kernel:
        rare = _span(r, "        else:", "return t, cnt", after="if tl.max(nb, axis=0) <= CAP")  # bucket overflow
        if consts["FLOAT"]:
            rare |= _lines(r, "_tile_select(key, valid, k, sp, R, CAP, False")  # tiles with Inf/NaN/subnormals
        return rare
    if kernel is sm._rows_hist_kernel:  # levels past the second (ties, clusters); the ranked tie path; k = 0
        h = score_mask_hist
        return (_span(h, "                while go:", "                    s = tl.maximum(s - BITS, 0)")
                | _span(h, "            else:  # ties straddle", "stride_b, BLOCK, B2, WRITE_MASK, WRITE_BITS, ZERO_W)")
                | _span(h, "            _hist_out(tl.zeros([BLOCK]", "stride_b, BLOCK, B2, WRITE_MASK, WRITE_BITS, ZERO_W)"))
    return set()


def _trip_count(chain: tuple) -> int | None:
    """N of the innermost ``for ... in range(N)`` enclosing the loop body's innermost source line."""
    mods = {os.path.basename(m.__file__): m for m in (score_mask_radix, score_mask_hist, score_mask_hist_smem, sm)}
    ours = [c for c in chain if c[0] in mods]  # the innermost of our own lines (Triton's reductions are inlined)
    if not ours:
        return None
    name, line = ours[-1]
    src = inspect.getsource(mods[name]).splitlines()
    ind = len(src[line - 1]) - len(src[line - 1].lstrip())
    for j in range(line - 2, -1, -1):
        m = (re.match(r"(\s*)for \w+ in range\((\d+)\)", src[j])  # a while loop states its expected trips
             or re.match(r"(\s*)while .*# expected trips: (\d+)", src[j]))
        if m and len(m.group(1)) < ind:
            return int(m.group(2))
    return None


def analyse(compiled, kernel, rare: set, warps_per_row: float) -> dict:
    res, lines, chains = st.annotated_listing(compiled)
    div = [int(m.group(1), 16) for ln in lines for m in [re.search(r"BRA\.DIV\s+\S+\s+0x([0-9a-f]+)", ln)] if m]
    end = next((i for i, ln in enumerate(lines) if div and st.address(ln) >= min(div)), len(lines))
    loops = [(a, b) for a, b in st.loops(lines) if b < end]
    weight = [1] * len(lines)
    skip = [any(c in rare for c in ch) for ch in chains]
    loop_info = []
    for a, b in loops:
        chain = collections.Counter(chains[a:b + 1]).most_common(1)[0][0]
        trips = _trip_count(chain)
        is_rare = any(c in rare for c in chain)
        loop_info.append({"instructions": b - a + 1, "source": " <- ".join(f"{f}:{n}" for f, n in reversed(chain)), "trips": trips,
                          "rare_path": is_rare})
        for j in range(a, b + 1):
            weight[j] *= trips or 1
            skip[j] |= is_rare  # the whole body: a few of its lines lack the inlining frames
    by_src = collections.Counter()
    for j, w in enumerate(weight[:end]):
        if not skip[j]:
            by_src[" <- ".join(f"{f}:{n}" for f, n in reversed(chains[j][:2]))] += w
    common = sum(by_src.values())
    mix = st.op_mix(lines)
    kname = os.path.basename(inspect.getsourcefile(kernel.fn))
    first = inspect.getsourcelines(kernel.fn)[1]
    span = range(first, first + len(inspect.getsource(kernel.fn).splitlines()))
    unattributed = sum(1 for ch in chains[:end] if not ch or ch[0][0] != kname or ch[0][1] not in span)
    out = {**st.resources(res, compiled), "spill_stl_ldl": mix["STL"] + mix["LDL"],
           "sass_instructions": len(lines),
           "body_instructions_without_kernel_line": unattributed, "divergence_handler_instructions": len(lines) - end,
           "shfl": mix["SHFL"], "redux": mix["REDUX"], "bar": mix["BAR"], "loops": loop_info,
           "common_path_instructions_per_warp": common,
           # the split needs every line's inlining frames and every common loop's trip count (Triton 3.6's
           # line table often lacks the frames: there the per-row figure is a rough count, not a path)
           "per_row_estimate_reliable": (unattributed == 0 or not (rare or loop_info)) and all(l["trips"] or l["rare_path"] for l in loop_info), "warps_per_row": warps_per_row,
           "warp_instructions_per_row": round(common * warps_per_row),
           "common_path_by_source": dict(by_src.most_common(12)), "mix": dict(mix.most_common(14))}
    return out


def variant(cols: int, tune: dict) -> dict:
    cfg = sm._rows_config(cols, 2, tune)
    fn = cfg["kernel"]
    consts = {**FLAGS, **cfg["consts"]}
    types = {n: t for n, t in TYPES.items() if n in fn.arg_names}
    c = st.compile_kernel(fn, types, consts, cfg["num_warps"], list(types), stages=3, enable_fp_fusion=False,
                          **cfg.get("options", {}))
    wpr = cfg["num_warps"] / cfg["rows_per_prog"]
    if cfg["chunked"]:
        wpr = cfg["num_warps"]
    out = {"kernel": fn.__name__, "constexprs": cfg["consts"], "num_warps": cfg["num_warps"],
           "rows_per_prog": cfg["rows_per_prog"], **analyse(c, fn, rare_lines(fn, cfg["consts"]), wpr)}
    return out


def copy_floor(cols: int) -> dict:
    """The benchmark's copy kernel (read W and the norms, write a bool; 2048 columns, 4 warps a program)."""
    fn = copy_floor_kernel
    c = st.compile_kernel(fn, {"w_ptr": "*fp16", "f_ptr": "*fp32", "out_ptr": "*u8", "n_cols": "i32"},
                          {"BLOCK": CF_BLOCK}, CF_WARPS, ["w_ptr", "f_ptr", "out_ptr", "n_cols"], stages=3)
    return {"kernel": fn.__name__, **analyse(c, fn, set(), CF_WARPS * triton.cdiv(cols, CF_BLOCK))}


def _measured() -> dict:
    """(rows, cols) -> measured ms of the 50% figures of the score-and-mask suite's JSON, if there is one."""
    if not os.path.exists(MEASURED):
        return {}
    data = json.load(open(MEASURED))
    rows = data.get("figures", data.get("score_mask", []))  # the suite's "figures", or a "score_mask" list
    out = {}
    for row in rows:
        if row.get("pattern") == "50%" and row.get("score", "wanda") == "wanda":
            t = row.get("times_ms", row.get("ms", {}))
            out[tuple(row["shape"])] = {"copy_floor": t.get("copy", t.get("copy_floor")), "hist": t.get("kernel"),
                                        "radix1": t.get("kernel_radix1")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "sass_score_mask.json"))
    ap.add_argument("--only", default=None, help="comma-separated prefixes of the variants to cost, e.g. hist,copy")
    args = ap.parse_args(argv)
    measured = _measured()
    gpu = json.load(open(MEASURED)).get("env", {}).get("gpu") if measured else None
    out = {"target": "sm_90", "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": " ".join(__doc__.split("\n\n")[1].split()), "dtype": "float16", "mode": "wanda, bool mask",
           "measured_on": gpu, "variants": {}}
    variants = [("hist", {"select": "hist"}), ("radix1", {"select": "radix1"})]
    for cols in (4096, 11008, 28672):
        for name, tune in [("copy_floor", None)] + variants:
            if args.only and not name.startswith(tuple(args.only.split(","))):
                continue
            key = f"cols={cols} {name}"
            try:
                st_ = copy_floor(cols) if tune is None else variant(cols, tune)
            except Exception as exc:  # noqa: BLE001 - report it and go on
                out["variants"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(key, out["variants"][key], file=sys.stderr)
                continue
            st_["shapes"] = {}
            for shape in SHAPES[cols]:
                ms = shape[0] * st_["warp_instructions_per_row"] / ISSUE_PER_MS
                d = {"issue_bound_ms": round(ms, 4)}
                m = measured.get(shape, {})
                if m.get(name):
                    d["measured_ms"] = round(m[name], 4)
                    d["issue_bound_over_measured"] = round(ms / m[name], 2)
                if m.get("copy_floor"):
                    d["measured_copy_floor_ms"] = round(m["copy_floor"], 4)
                st_["shapes"][f"{shape[0]}x{shape[1]}"] = d
            out["variants"][key] = st_
            print(key, {k: st_[k] for k in ("registers", "stack_bytes", "spill_stl_ldl", "shared_bytes",
                                            "sass_instructions", "shfl", "bar", "warp_instructions_per_row")},
                  file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(args.out)


if __name__ == "__main__":
    main()
