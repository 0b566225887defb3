"""The package layout: no import cycle between its modules, and a small public API."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import llmprune_kernels

PKG = Path(llmprune_kernels.__file__).resolve().parent
NAME = "llmprune_kernels"
EXTENSION = f"{NAME}._C"  # the compiled library: not a Python module of the package


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, counting every import statement (also inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from a import b`` imports the module a.b when there is one, else names of a
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                           if f"{base}.{a.name}" != EXTENSION]
            for t in targets:
                while t and t not in mods and t.startswith(NAME):
                    t = t.rpartition(".")[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and graph[f"{NAME}.sparse24.linear"], "the graph must see the package's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_public_api_is_small_and_importable():
    names = llmprune_kernels.__all__
    assert len(names) <= 20, names
    for name in names:
        assert getattr(llmprune_kernels, name) is not None


def test_every_op_has_a_schema_and_a_fake():
    """library.py defines each op the C++ files implement, and a fake for each op torch.compile may trace."""
    from llmprune_kernels import library

    csrc = Path(__file__).resolve().parents[1] / "csrc"  # the source tree (the installed package has no csrc)
    implemented = set()
    for path in list(csrc.rglob("*.cpp")) + list(csrc.rglob("*.cu")):
        implemented |= set(re.findall(r'm\.impl\("(\w+)"', path.read_text()))
    assert implemented and implemented <= set(library.SCHEMAS), implemented - set(library.SCHEMAS)
    for name in library.SCHEMAS:
        assert hasattr(getattr(torch.ops.llmprune_kernels, name), "default"), name


def test_sparsegpt_ops_pass_opcheck():
    if not llmprune_kernels._ext.HAS_EXT:
        pytest.skip("_C not built")
    w, x = torch.randn(16, 64), torch.randn(2, 8, 64)
    H = torch.zeros(64, 64)
    torch.library.opcheck(torch.ops.llmprune_kernels.sparsegpt_add_batch.default, (H, x, 0),
                          test_utils=("test_schema", "test_faketensor"))
    H = x.reshape(-1, 64).T @ x.reshape(-1, 64) + torch.eye(64)
    torch.library.opcheck(torch.ops.llmprune_kernels.sparsegpt_prune.default,
                          (w, H, 0.5, 0, 0, 32, 0.01, 2, "layer", False), test_utils=("test_schema", "test_faketensor"))
