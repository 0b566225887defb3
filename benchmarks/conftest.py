"""The harness every benchmark suite shares: environment record, CUDA timing, the suite's canonical JSON.

* ``env_info()``: GPU name and count, compute capability, SMs, L2 size, torch / triton / CUDA / cuSPARSELt
  versions, the package's ``backends()``, Python, git commit, date (UTC).
* Timing (``replayer``, ``time_interleaved``, ``gpu_ms``): CUDA-event medians. A timed run makes ``calls``
  calls cycling through a list of functions, after a warm-up, as one CUDA-graph replay (``graph=True``: the
  GPU's time alone, no Python / launch overhead) or eagerly (``graph=False``: what an eager caller pays).
  Several runs are timed in turn within every trial (``time_interleaved``), so clock and power drift over a
  run weigh on a figure and its baseline alike; each figure is the median over trials.
* Cache state: *cold* = the functions cycle through copies of the operands that together hold more than
  twice the L2 cache (``cold_copies``), so every call reads its weight from HBM, as in a model whose layers
  are visited in turn; *hot* = one copy called repeatedly (resident in L2 where it fits: the figure says
  how many bytes the weight has and how large the L2 is).
* ``Results``: the suite's canonical JSON, ``benchmarks/results/<suite>.json`` (or under
  ``$LLMPRUNE_BENCH_RESULTS``), rewritten after every figure so a run cut short keeps what it measured.
  Each figure names its baseline and gives the ratio against it; nothing here asserts on a time.
* ``QUICK`` (``$LLMPRUNE_BENCH_QUICK=1``, set by ``run_all.sh --quick``): suites measure fewer cases.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

RESULTS_DIR = Path(os.environ.get("LLMPRUNE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
QUICK = os.environ.get("LLMPRUNE_BENCH_QUICK", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

try:  # the copy floor of the score-and-mask suite (also costed statically by tools/sass_score_mask.py)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional on CPU
    HAS_TRITON = False

COPY_BLOCK = 2048  # columns per program of copy_floor_kernel
COPY_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def copy_floor_kernel(w_ptr, f_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        """The score-and-mask kernel's bytes with no selection: read W and the norm row, write a bool."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_cols
        w = tl.load(w_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + cols, mask=m, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, (w < f).to(tl.uint8), mask=m)


def copy_floor(w: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    """Launch ``copy_floor_kernel`` on a 2-D ``w``, an fp32 row ``f`` of its width and a bool ``out``."""
    rows, cols = w.shape
    copy_floor_kernel[(rows, triton.cdiv(cols, COPY_BLOCK))](w, f, out.view(torch.uint8), cols, BLOCK=COPY_BLOCK,
                                                             num_warps=COPY_WARPS)


# -- environment --------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    """HEAD of the checkout; ``$LLMPRUNE_BENCH_COMMIT`` names it for a source tree without ``.git``."""
    if os.environ.get("LLMPRUNE_BENCH_COMMIT"):
        return os.environ["LLMPRUNE_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info() -> dict:
    """Where and with what a figure was measured."""
    try:
        import triton as _triton

        triton_version = _triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover
        transformers_version = None
    from llmprune_kernels import __version__, backends

    info = {
        "gpu": torch.cuda.get_device_name(0) if HAS_CUDA else None,
        "gpu_count": torch.cuda.device_count() if HAS_CUDA else 0,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cusparselt": (torch.backends.cusparselt.version()
                       if HAS_CUDA and torch.backends.cusparselt.is_available() else None),
        "transformers": transformers_version,
        "llmprune_kernels": __version__,
        "backends": backends(),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": QUICK,
    }
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        info["capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
        info["l2_bytes"] = l2_bytes()
    return info


@pytest.fixture(scope="session")
def env() -> dict:
    return env_info()


# -- cache state --------------------------------------------------------------------------------------------
def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def cold_copies(nbytes: int, max_copies: int = 16) -> int:
    """Copies of an operand of ``nbytes`` that one pass through all of them reads more than twice the L2."""
    return max(2, min(max_copies, math.ceil(2 * l2_bytes() / max(nbytes, 1)) + 1))


# -- timing -------------------------------------------------------------------------------------------------
class Run:
    """``calls`` calls cycling through ``fns``, warmed up, replayed as one CUDA graph when ``graph``."""

    def __init__(self, fns: list[Callable[[], object]], calls: int | None = None, graph: bool = True):
        self.fns = list(fns)
        n = len(self.fns)
        self.calls = calls or max(n, 10)
        self.calls = n * math.ceil(self.calls / n)  # every copy equally often
        self.graph = graph
        for f in self.fns:  # warm-up: compiles, autotuning, plan creation, allocator
            f()
        torch.cuda.synchronize()
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for f in self.fns:
                    f()
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._loop()
            self._run = self._graph.replay
        else:
            self._run = self._loop
        self._run()
        torch.cuda.synchronize()

    def _loop(self) -> None:
        fns, n = self.fns, len(self.fns)
        for i in range(self.calls):
            fns[i % n]()

    def __call__(self) -> None:
        self._run()


def replayer(fns, calls: int | None = None, graph: bool = True) -> Run:
    return Run(fns if isinstance(fns, (list, tuple)) else [fns], calls, graph)


def time_interleaved(runs: dict[str, Run | None], trials: int = 7) -> dict[str, float | None]:
    """Milliseconds per call of each run (median over ``trials``; the runs timed in turn in every trial)."""
    live = {k: r for k, r in runs.items() if r is not None}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(trials):
        for k, r in live.items():
            start.record()
            r()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end) / r.calls)
    return {k: (statistics.median(times[k]) if k in times else None) for k in runs}


def gpu_ms(fns, calls: int | None = None, graph: bool = True, trials: int = 7) -> float:
    """Milliseconds per call of one run (see ``Run``)."""
    return time_interleaved({"x": replayer(fns, calls, graph)}, trials)["x"]


def try_run(fns, calls: int | None = None, graph: bool = True, errors: dict | None = None,
            name: str = "") -> Run | None:
    """``replayer``, or None (the error recorded under ``name`` in ``errors``) when the path cannot run."""
    try:
        return replayer(fns, calls, graph)
    except Exception as exc:  # noqa: BLE001 - a path that cannot run this case is recorded, not fatal
        if errors is not None:
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.synchronize()
        return None


def wall_s(fn: Callable[[], object], runs: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, all) wall-clock seconds of ``fn`` with the GPU synchronised before and after each call: for
    figures of milliseconds to seconds, e.g. host-driven reference loops."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), out


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation (what pytest-benchmark's own timer should see)."""
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


# -- results ------------------------------------------------------------------------------------------------
_ALL_RESULTS: list["Results"] = []


class Results:
    """The canonical JSON of one suite: ``{"suite", "env", "method", "figures": [...], **extra}``.

    Every figure is a dict naming its case, its times, its ``baseline`` and ``ratios`` against it; the file
    is rewritten (atomically) after each ``add`` and ``set``, once it holds a figure (a run that measures
    nothing leaves the existing file alone).
    """

    def __init__(self, suite: str, method: str, env: dict):
        self.suite = suite
        self.path = RESULTS_DIR / f"{suite}.json"
        self.data = {"suite": suite, "env": env, "method": " ".join(method.split()), "figures": []}
        _ALL_RESULTS.append(self)

    def add(self, figure: dict) -> dict:
        self.data["figures"].append(figure)
        self.write()
        return figure

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> Path | None:
        from llmprune_kernels.pipeline.report import write_json

        if not self.data["figures"]:
            return None
        self.data["figure_count"] = len(self.data["figures"])
        return write_json(self.data, self.path)


def pytest_sessionfinish(session, exitstatus):
    """Say which canonical JSON files this pytest run wrote (run_all.sh prints them too)."""
    written = sorted({str(r.path) for r in _ALL_RESULTS if r.data["figures"]})
    if written:
        sys.stdout.write("\nresults written: " + ", ".join(written) + "\n")

