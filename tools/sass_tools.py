"""Compile Triton kernels for sm_90 on a machine without a GPU and read their SASS (shared by the sass_* scripts).

``compile_kernel`` runs Triton's whole pipeline for ``GPUTarget("cuda", 90, 32)`` from an ``ASTSource``;
``sass_listing`` disassembles the cubin with the ``cuobjdump`` bundled with Triton; the parsers count
instructions by opcode and find loops (backward branches). Static counts only: latency, occupancy and
memory behaviour are for GPU timings to decide.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)
_ADDR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/")
_OP = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def compile_kernel(fn, types: dict, consts: dict, warps: int, div16: list[str], stages: int = 1, **options):
    """``triton.compile`` of ``fn`` for sm_90: ``types`` per non-constexpr argument, 16-divisible ``div16``;
    ``options``: further compile options as a launch passes them (e.g. ``enable_fp_fusion=False``)."""
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages, **options})


def _disassemble(compiled, *commands: tuple[str, ...]) -> list[str]:
    """stdout of each bundled CUDA tool command (e.g. ``("cuobjdump", "-sass")``) run on the kernel's cubin."""
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(compiled.asm["cubin"])
        return [subprocess.run([os.path.join(BIN, tool), *args, cub], capture_output=True, text=True,
                               check=True).stdout for tool, *args in commands]


def sass_listing(compiled) -> tuple[str, list[str]]:
    """(``cuobjdump -res-usage`` text, SASS instruction lines) of a compiled kernel."""
    res, sass = _disassemble(compiled, ("cuobjdump", "-res-usage"), ("cuobjdump", "-sass"))
    return res, [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)]


_FILE = re.compile(r'\s*//## File "([^"]+)", line (\d+)')


def annotated_listing(compiled) -> tuple[str, list[str], list[tuple]]:
    """(resource usage, SASS instruction lines, source chain of each line) from ``nvdisasm -gi``.

    A chain is ((file, line), ...) from the kernel's own line outward-in to the innermost inlined callee's;
    branch targets are rewritten from labels to ``0x<address>`` so that ``loops`` reads them.
    """
    res, dis = _disassemble(compiled, ("cuobjdump", "-res-usage"), ("nvdisasm", "-gi"))
    text = dis[dis.index(f".text.{compiled.metadata.name}:"):]
    lines, chains, labels, block, chain = [], [], {}, [], ()
    pending = []
    for ln in text.splitlines()[1:]:
        if ln.startswith("//----"):
            break
        m = _FILE.match(ln)
        if m:
            block.append((os.path.basename(m.group(1)), int(m.group(2))))
        elif re.match(r"\.L_x_\d+:", ln):
            pending.append(ln[:-1])
        elif _ADDR.match(ln):
            if block:
                chain, block = tuple(reversed(block)), []
            for lab in pending:
                labels[lab] = address(ln)
            pending = []
            lines.append(ln)
            chains.append(chain)
    lines = [re.sub(r"`\((\.L_x_\d+)\)", lambda m: f"0x{labels.get(m.group(1), 0):x}", ln) for ln in lines]
    return res, lines, chains


def address(line: str) -> int:
    return int(_ADDR.match(line).group(1), 16)


def opcode(line: str) -> str | None:
    """Base opcode of a SASS line (``SHFL.BFLY`` -> ``SHFL``), predicate stripped."""
    m = _OP.match(line)
    return m.group(2).split(".")[0] if m else None


def op_mix(lines: list[str]) -> collections.Counter:
    ops = collections.Counter()
    for ln in lines:
        op = opcode(ln)
        if op:
            ops[op] += 1
    return ops


def loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line indices of every loop body, one per backward branch, in address order."""
    addr = [address(ln) for ln in lines]
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:
            target = int(m.group(1), 16)
            out.append((next(j for j in range(len(lines)) if addr[j] >= target), i))
    return out


def resources(res: str, compiled) -> dict:
    reg = re.search(r"REG:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"registers": int(reg.group(1)) if reg else None, "spill_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None, "shared_bytes": compiled.metadata.shared}


def sass_stats(compiled) -> dict:
    """Registers, spills, shared memory, and the first loop's (the main loop's) size and opcode mix."""
    res, lines = sass_listing(compiled)
    lp = loops(lines)
    body = lines[lp[0][0]:lp[0][1] + 1] if lp else []  # the first backward branch closes the main loop
    return {**resources(res, compiled), "loop_instructions": len(body),
            "loop_mix": dict(op_mix(body).most_common(12))}
