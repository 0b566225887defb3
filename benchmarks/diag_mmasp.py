"""GPU diagnostics of the mma.sp 2:4 kernel's layout (run first by benchmarks/run_mmasp_gpu.sh).

1. Probe: one hardware ``mma.sp`` on random registers vs the CPU emulator's documented semantics
   (:func:`llmprune_kernels.testing.mmasp_emulator.mma_sp_m16n8k32`), fp16 / bf16, selector 0 / 1. On a
   mismatch, every transform of the metadata words in a small family (which lane of a quad supplies the
   words, 16-bit halves swapped, the two 2-bit indices of a nibble swapped) is tried on the hardware; a
   transform T with ``hw(T(e)) == emulator(e)`` says how ``to_mmasp_layout`` must change.
2. One tile: out=16, in=32 (padded to 256), M=8, weight with a known pattern; prints which outputs of
   the op differ from the dense result (grid of rows x tokens), then the same at out=48, in=600, M=16
   with every launch config.
Exit status 0 when everything matches.
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.backends import mmasp as mm
from llmprune_kernels.testing.mmasp_emulator import mma_sp_m16n8k32, probe_inputs, regs_as_int32
from llmprune_kernels.testing import random_24_weight
from llmprune_kernels.sparse24.pack import pack_24


def _transform(e: torch.Tensor, perm, swap16: bool, swapnib: bool) -> torch.Tensor:
    w = e.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(8, 4)[:, list(perm)].reshape(32)
    if swap16:
        w = ((w & 0xFFFF) << 16) | (w >> 16)
    if swapnib:  # swap the 2-bit fields inside each nibble
        w = ((w & 0x33333333) << 2) | ((w >> 2) & 0x33333333)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def probe_check() -> bool:
    ok = True
    for dtype, sel in itertools.product((torch.float16, torch.bfloat16), (0, 1)):
        inp = probe_inputs(dtype, seed=sel)
        want = mma_sp_m16n8k32(inp["a"], inp["b"], inp["e"], sel)
        a, b = regs_as_int32(inp["a"]).cuda(), regs_as_int32(inp["b"]).cuda()
        bf16 = dtype == torch.bfloat16
        got = mm.probe(a, b, inp["e"].cuda(), sel, bf16).cpu()
        err = (got - want).abs().max().item()
        tol = 1e-3 * (1 + want.abs().max().item())
        print(f"probe {dtype} sel={sel}: max |hw - emulator| = {err:.3g} (tol {tol:.3g})")
        if err <= tol:
            continue
        ok = False
        bad = ((got - want).abs() > tol).nonzero().tolist()
        print(f"  wrong (lane, d-element): {bad[:40]}{' ...' if len(bad) > 40 else ''}")
        hits = []
        for perm in itertools.permutations(range(4)):
            for swap16, swapnib in itertools.product((False, True), repeat=2):
                e2 = _transform(inp["e"], perm, swap16, swapnib).cuda()
                g2 = mm.probe(a, b, e2, sel, bf16).cpu()
                if (g2 - want).abs().max().item() <= tol:
                    hits.append((perm, swap16, swapnib))
        print(f"  metadata transforms T with hw(T(e)) == emulator(e) (lane perm in a quad, swap16, swapnib): {hits}")
        # Also: does the A or B fragment order differ? Try a swapped register order of a.
        for order in itertools.permutations(range(4)):
            a2 = a[:, list(order)].contiguous()
            g2 = mm.probe(a2, b, inp["e"].cuda(), sel, bf16).cpu()
            if (g2 - want).abs().max().item() <= tol and order != (0, 1, 2, 3):
                print(f"  A register order {order} matches")
            b2 = b[:, list(order)].contiguous()
            g3 = mm.probe(a, b2, inp["e"].cuda(), sel, bf16).cpu()
            if (g3 - want).abs().max().item() <= tol and order != (0, 1, 2, 3):
                print(f"  B register order {order} matches")
    return ok


def _grid(bad: torch.Tensor) -> str:
    return "\n".join("    " + "".join("X" if v else "." for v in row) for row in bad.tolist())


def tile_check() -> bool:
    ok = True
    for dtype in (torch.float16, torch.bfloat16):
        # Known pattern: row r keeps columns (r % 3, 3) of every group, values r + 1 + col/32.
        w = torch.zeros(16, 32)
        for r in range(16):
            for g in range(8):
                w[r, 4 * g + r % 3] = r + 1
                w[r, 4 * g + 3] = -(g + 1) / 4
        w = w.to(dtype).cuda()
        x = (torch.arange(8 * 32).reshape(8, 32) % 7 - 3).to(dtype).cuda() / 4
        lay = mm.to_mmasp_layout(pack_24(w))
        got = mm.mmasp_linear(x, lay, config=(4, 1, 1)).float()
        ref = F.linear(x.float(), w.float())
        bad = (got - ref).abs() > 1e-2 * (1 + ref.abs())
        print(f"tile 16x32 {dtype}: {int(bad.sum())} wrong of {bad.numel()}")
        if bad.any():
            ok = False
            print("  wrong outputs (rows = tokens 0..7, columns = output rows 0..15):\n" + _grid(bad))
        w = random_24_weight(48, 600, dtype, "cuda")
        x = torch.randn(16, 600, device="cuda").to(dtype)
        bias = torch.randn(48, device="cuda").to(dtype)
        lay = mm.to_mmasp_layout(pack_24(w))
        ref = F.linear(x.float(), w.float(), bias.float())
        for cfg in itertools.product(mm.WARPS, mm.ROWS_PER_WARP, mm.SPLITS):
            got = mm.mmasp_linear(x, lay, bias, config=cfg).float()
            bad = (got - ref).abs() > 2e-2 * (1 + ref.abs())
            if bad.any():
                ok = False
                print(f"48x600 M=16 {dtype} config {cfg}: {int(bad.sum())} wrong; rows=tokens, cols=outputs:\n"
                      + _grid(bad))
        torch.cuda.synchronize()
    print("tile / config check", "passed" if ok else "FAILED")
    return ok


if __name__ == "__main__":
    if not mm.available():
        print("mma.sp op not available (CPU build or no GPU)")
        sys.exit(2)
    p = probe_check()
    t = tile_check()
    sys.exit(0 if (p and t) else 1)
