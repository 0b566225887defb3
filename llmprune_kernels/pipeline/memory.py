"""Where calibration activations live during the layer walk, and how much memory the process holds.

Activations (the hidden states entering and leaving the current decoder layer, one tensor per batch) stay
on the compute device when they fit a GPU memory budget; otherwise they are kept in pinned CPU memory and
each batch is copied to the GPU on a side CUDA stream while the previous batch computes. On a machine
without CUDA there is nothing to pin or prefetch: host copies are plain ``.cpu()`` and batches move with
``.to(device)``.

Inside ``host_buffers()`` (the layer walk of an offloaded run) the host copies come from a pool of page-locked
buffers of their exact size (``cudaHostRegister`` on plain host memory), each given back when its tensor is
freed and reused by the next layer's activations. torch's pinned allocator rounds every block up to a power of
two: a LLaMA-13B batch of 8 x 2048 x 5120 fp16 (160 MiB) would hold 256 MiB.
"""
from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Iterator, Sequence

import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """``"20GB"`` -> 20_000_000_000, ``"20GiB"`` -> 20 * 2**30, ``"512MB"``, ``123`` (bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory size {text!r} is invalid; allowed: a number of bytes with an optional unit "
                             f"(KB, MB, GB, TB or KiB, MiB, GiB, TiB), e.g. 20GB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"memory size {text!r} is invalid; allowed: at least 1 byte")
    return value


def check_gpu_memory(gpu_memory: int | None) -> None:
    if gpu_memory is not None and (isinstance(gpu_memory, bool) or not isinstance(gpu_memory, int)
                                   or gpu_memory < 1):
        raise ValueError(f"gpu_memory {gpu_memory!r} is invalid; allowed: None (no budget) or a number of bytes "
                         f">= 1 (memory.parse_bytes turns '20GB' into bytes)")


def layer_need_bytes(layer_bytes: int, in_features: Sequence[int], activation_bytes: int,
                     batch_activation_bytes: int) -> int:
    """Device memory the walk of one decoder layer needs with its activations on the device.

    The layer's weights, a snapshot of them (for the reconstruction error), the largest statistics a method
    keeps (a Hessian, fp32, per Linear), the activations entering and leaving the layer, and one batch's
    intermediate tensors (a few times one batch of activations).
    """
    hessians = sum(4 * n * n for n in in_features)
    return 2 * layer_bytes + hessians + 2 * activation_bytes + 8 * batch_activation_bytes


def offload_needed(device: torch.device, gpu_memory: int | None, need: int) -> bool:
    """Keep activations in CPU memory: a CUDA device and a budget below ``need`` (no budget: keep on device)."""
    return device.type == "cuda" and gpu_memory is not None and need > gpu_memory


class HostBufferPool:
    """Page-locked host buffers by exact byte size; see the module docstring. ``take`` returns None where the
    memory cannot be registered (the caller then uses torch's pinned allocator)."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._open = True
        self.registered_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        with self._lock:
            bufs = self._free.get(nbytes)
            if bufs:
                return bufs.pop()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) != 0:
            return None
        with self._lock:
            self.registered_bytes += nbytes
        return buf

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if self._open:
                self._free.setdefault(buf.numel(), []).append(buf)
                return
        self._unregister(buf)

    def close(self) -> None:
        """Unregister the free buffers; buffers still in use are unregistered when their tensors are freed."""
        with self._lock:
            self._open = False
            bufs = [b for group in self._free.values() for b in group]
            self._free = {}
        for b in bufs:
            self._unregister(b)

    def _unregister(self, buf: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        with self._lock:
            self.registered_bytes -= buf.numel()


_POOL: HostBufferPool | None = None


@contextlib.contextmanager
def host_buffers(enabled: bool = True) -> Iterator[HostBufferPool | None]:
    """While open (and ``enabled`` with CUDA available), ``to_host`` copies into pooled exact-size page-locked
    buffers; on exit the pool's buffers are unregistered and freed."""
    global _POOL
    if not (enabled and torch.cuda.is_available()) or _POOL is not None:
        yield _POOL
        return
    _POOL = pool = HostBufferPool()
    try:
        yield pool
    finally:
        _POOL = None
        pool.close()


def to_host(t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """A CPU copy of ``t``: pinned (fast, asynchronous copies back to the GPU) when CUDA is available.
    ``non_blocking``: the copy is queued on the current stream; synchronise it before reading the copy."""
    if t.device.type == "cpu":
        return t
    if torch.cuda.is_available():
        pool = _POOL
        buf = pool.take(t.numel() * t.element_size()) if pool is not None and t.numel() > 0 else None
        if buf is not None:
            out = buf.view(t.dtype).view(t.shape)
            weakref.finalize(out, pool.give, buf)  # the buffer returns to the pool with its tensor
        else:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=non_blocking)
        return out
    return t.cpu()


def device_batches(inputs: Sequence[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """``inputs`` on ``device`` one at a time; host batches go to a CUDA device on a side stream, one ahead."""
    if device.type != "cuda" or not torch.cuda.is_available() or all(t.device.type == "cuda" for t in inputs):
        for t in inputs:
            yield t.to(device)
        return
    side = torch.cuda.Stream(device)

    def start(t: torch.Tensor):
        with torch.cuda.stream(side):
            moved = t.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return moved, done

    pending = start(inputs[0]) if inputs else None
    for i in range(len(inputs)):
        moved, done = pending
        pending = start(inputs[i + 1]) if i + 1 < len(inputs) else None
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        moved.record_stream(current)  # the side stream's allocation is in use on the compute stream
        yield moved


def release_host_memory() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; nothing elsewhere).

    Freed layer-sized buffers otherwise stay in the process's heap, fragmented, and resident memory grows by
    about a layer per layer walked.
    """
    global _trim
    if _trim is None:
        import ctypes
        import ctypes.util

        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


def rss_bytes() -> int:
    """Resident memory of this process."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # psutil is optional: the peak from getrusage (KiB on Linux) is the best left
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_in_use(device: torch.device) -> str:
    """``rss 1.2G gpu 3.4G peak 5.6G``: the process's resident memory, and the GPU's where it computes."""
    text = f"rss {rss_bytes() / 2**30:.1f}G"
    if device.type == "cuda" and torch.cuda.is_available():
        text += (f" gpu {torch.cuda.memory_allocated(device) / 2**30:.1f}G"
                 f" peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G")
    return text
