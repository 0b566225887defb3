"""The README's test command is what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert cmd in readme
    assert "pytest python_tests" in cmd
