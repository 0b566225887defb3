"""Resumable runs: a work directory beside the output directory, checkpointed after each decoder layer.

A run with an output directory ``OUT`` keeps ``.OUT.llmprune-partial`` beside it, holding

* ``model-XXXXX-of-YYYYY.safetensors``: the tensors of each completed decoder layer (the output's shards),
* ``manifest.json``: what the run is (method, sparsity, options, source, a hash of the calibration ids,
  library version, layer count, ...) and the layers completed so far with their report lines.

The process working in it holds it with ``atomic.reserve`` (a second run on the same output fails at once).

A layer's shard is on disk before the manifest (rewritten atomically) names the layer completed, so a run
killed at any point restarts after the last layer the manifest names. Both are written by one background
thread while the next layer computes (the layer's tensors copied to CPU memory first, so at most one layer
waits in CPU memory); a failed write is raised by the next ``save_layer`` or by ``wait``. Activations are not
stored (at 7B they are 2 GB per layer): the resumed run recomputes them by running the completed layers forward
again (``prune.prune_layers``), and so computes the same bits as a run that was never interrupted.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from llmprune_kernels.atomic import atomic_file, reserve, resolve_target
from llmprune_kernels.pipeline.report import write_json

MANIFEST_FORMAT = 1
WORK_SUFFIX = ".llmprune-partial"
MANIFEST = "manifest.json"


def work_dir_for(output_dir: str | os.PathLike) -> Path:
    """``.NAME.llmprune-partial`` beside the output directory ``NAME``."""
    out = resolve_target(output_dir)
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def remove_work_dir(output_dir: str | os.PathLike) -> None:
    """Remove the work directory of ``output_dir`` (once the output is saved it is no longer needed).

    Raises ``atomic.TargetBusyError`` while a run is working in it."""
    path = work_dir_for(output_dir)
    if path.exists():
        with reserve(path, overwrite=True, kind="dir"):
            shutil.rmtree(path)


def shard_name(index: int, nshards: int) -> str:
    """``model-00003-of-00009.safetensors`` for ``index`` 2 (0-based) of 9 shards."""
    return f"model-{index + 1:05d}-of-{nshards:05d}.safetensors"


def calibration_digest(ids: torch.Tensor | None) -> str | None:
    """SHA-256 of the calibration ids (shape and values), or None without calibration."""
    if ids is None:
        return None
    h = hashlib.sha256(f"{tuple(ids.shape)}|{ids.dtype}|".encode())
    h.update(ids.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def library_version() -> str | None:
    try:
        return importlib.metadata.version("llmprune_kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file (CPU copies of ``tensors``), committed atomically; replaces an older one."""
    from safetensors.torch import save_file

    with atomic_file(path, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, read straight to ``device``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


class Checkpoint:
    """The work directory of one run: its manifest and completed layers."""

    def __init__(self, path: Path, manifest: dict[str, Any], hold: contextlib.ExitStack) -> None:
        self.path, self.manifest, self._hold = path, manifest, hold
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @classmethod
    def open(cls, output_dir: str | os.PathLike, identity: dict[str, Any], num_layers: int, *,
             resume: bool) -> "Checkpoint":
        """Start (or with ``resume``, continue) the work directory of ``output_dir``.

        An existing work directory without ``resume`` is an error, as is one whose manifest describes
        another run (the error names the first field that differs). ``resume`` without one starts afresh.
        """
        path = work_dir_for(output_dir)
        identity = _jsonable({**identity, "num_layers": num_layers, "library_version": library_version()})
        hold = contextlib.ExitStack()
        hold.enter_context(reserve(path, overwrite=True, kind="dir"))
        try:
            manifest = cls._start(path, identity, resume)
        except BaseException:
            hold.close()
            raise
        return cls(path, manifest, hold)

    @classmethod
    def _start(cls, path: Path, identity: dict[str, Any], resume: bool) -> dict[str, Any]:
        if path.exists() and not (path / MANIFEST).exists() and resume:  # killed before its first manifest
            shutil.rmtree(path)
        if path.exists():
            if not resume:
                raise FileExistsError(f"{str(path)!r} holds a pruning run that did not finish; pass resume=True "
                                      f"(CLI: --resume) to continue it, or remove that directory to start over")
            manifest = cls._read_manifest(path)
            stored = manifest["identity"]
            for key in sorted(set(stored) | set(identity)):
                if stored.get(key) != identity.get(key):
                    raise ValueError(
                        f"cannot resume {str(path)!r}: its run has {key}={stored.get(key)!r}, this one "
                        f"{key}={identity.get(key)!r}; rerun with the same settings, or remove that directory "
                        f"to start over")
        else:
            path.mkdir(parents=True)
            manifest = {"format": MANIFEST_FORMAT, "identity": identity, "completed_layers": 0, "linears": [],
                        "layer_times_s": [], "stage_times_s": {}, "elapsed_s": 0.0}
            write_json(manifest, path / MANIFEST)
        return manifest

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot resume {str(path)!r}: its {MANIFEST} is unreadable ({exc}); remove that "
                             f"directory to start over") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"cannot resume {str(path)!r}: its {MANIFEST} is not of format {MANIFEST_FORMAT}; "
                             f"remove that directory to start over")
        return manifest

    def wait(self) -> None:
        """Wait for the layer being written; raises its write's error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def release(self) -> None:
        """Finish the write in progress, then let other processes use the work directory (it stays on disk).
        Called on the way out, also after an error: a failed write is not raised here (the layer counts as
        not completed); the normal path calls ``wait`` first."""
        try:
            with contextlib.suppress(Exception):
                self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._hold.close()

    def remove(self) -> None:
        """Delete the work directory (the run is complete), then release it."""
        self.wait()
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    @property
    def completed(self) -> int:
        return int(self.manifest["completed_layers"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["identity"]["num_layers"])

    def shard(self, index: int) -> Path:
        """The shard file of decoder layer ``index``; shard ``num_layers`` holds everything else."""
        return self.path / shard_name(index, self.num_layers + 1)

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], linears: list[dict[str, Any]],
                   layer_time: float, stage_times: dict[str, float], elapsed: float) -> None:
        """Record decoder layer ``index`` as completed (its shard, then the manifest, written in the background
        after the previous layer's); ``elapsed``: the run's seconds so far, earlier processes included."""
        self.wait()
        if index != self.completed:
            raise RuntimeError(f"checkpoint of layer {index} after {self.completed} completed layers")
        host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}  # the layer may leave now
        m = dict(self.manifest)
        m["completed_layers"] = index + 1
        m["linears"] = m["linears"] + _jsonable(linears)
        m["layer_times_s"] = m["layer_times_s"] + [layer_time]
        m["stage_times_s"] = dict(stage_times)
        m["elapsed_s"] = elapsed
        shard = self.shard(index)

        def write() -> None:
            save_tensors(host, shard)
            write_json(m, self.path / MANIFEST)

        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="llmprune-checkpoint")
        self._pending = self._writer.submit(write)
        self.manifest = m

    def state_files(self) -> list[Path]:
        """What is the run's bookkeeping rather than output: the manifest."""
        return [p for p in self.path.iterdir() if p.name == MANIFEST]
