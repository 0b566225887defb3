"""One commit protocol for every file or directory the package writes.

A writer never writes under the target name: it writes into a temporary sibling named after the target
and the writing process, ``.NAME.llmprune-tmp-PID-RAND``, and renames it into place when complete.

* ``check_target``: the preflight check (writes nothing) a command line runs before any work;
* ``reserve``: hold a target for the whole job (exclusive lock; leftovers of dead writers recovered);
* ``atomic_dir`` / ``atomic_file``: write a directory / file into a temporary sibling, then commit it;
* ``recover``: what every writer does first, callable alone.

An existing target is replaced only with ``overwrite=True``, and nothing else is ever moved or deleted
except this protocol's own siblings left by dead processes. Local file systems only: liveness is a PID.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to O_CREAT|O_EXCL
    fcntl = None

log = logging.getLogger("llmprune_kernels")

Kind = Literal["dir", "file"]
_HINT = "pass overwrite=True (CLI: --overwrite)"


def _normalize(path: str | os.PathLike) -> Path:
    """``~`` expanded, absolute, parent resolved; the last component is kept as given (a symlink target
    is replaced as a link, never followed into what it points at)."""
    raw = os.path.expanduser(os.fspath(path))
    if not raw:
        raise ValueError("target path is empty; give a file or directory name")
    p = Path(os.path.abspath(raw))
    if p.name in ("", ".", ".."):
        raise ValueError(f"target path {str(path)!r} has no name of its own; give a file or directory name")
    return p.parent.resolve() / p.name


def check_target(path: str | os.PathLike, *, overwrite: bool, kind: Kind) -> Path:
    """The absolute target path, or a clear error if a write to it would fail or replace something.

    * exists with the wrong kind -> NotADirectoryError (a file where a directory is wanted) or
      FileExistsError (a directory where a file is wanted), whatever ``overwrite`` says;
    * exists and ``overwrite`` is False -> FileExistsError;
    * the nearest existing ancestor is a file -> NotADirectoryError; not writable -> PermissionError.
    Writes nothing.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind={kind!r}; allowed: 'dir' or 'file'")
    target = _normalize(path)
    what = "directory" if kind == "dir" else "file"
    if os.path.lexists(target):
        is_dir = target.is_dir()
        if kind == "dir" and not is_dir:
            raise NotADirectoryError(f"output {str(target)!r} exists and is not a directory; "
                                     f"give a directory path (a new one, or an existing directory with overwrite=True)")
        if kind == "file" and is_dir:
            raise FileExistsError(f"output {str(target)!r} exists and is a directory; give a file path")
        if not overwrite:
            raise FileExistsError(f"output {what} {str(target)!r} already exists; {_HINT} to replace it")
    anc = target.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise NotADirectoryError(f"cannot create output {what} {str(target)!r}: {str(anc)!r} is a file, "
                                 f"not a directory; choose a path under a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create output {what} {str(target)!r}: directory {str(anc)!r} "
                              f"is not writable; choose a writable location")
    return target


# ------------------------------------------------------------------------------------ the commit protocol
# For a target DIR/NAME a writer uses these siblings in DIR (PID: the writer's process id, RAND: 8 hex digits):
#   .NAME.llmprune-lock            the exclusive lock (flock), holding the owner's PID
#   .NAME.llmprune-tmp-PID-RAND    what is being written, or an old version being deleted: always garbage
#   .NAME.llmprune-old-PID-RAND    the complete previous target, between the two renames of a replacement
# A replacement renames TARGET -> old, tmp -> TARGET, old -> tmp (then deletes it), so an ``old`` name always
# holds a complete tree: the next writer restores it when TARGET is missing and its writer is dead.
TMP_TAG, OLD_TAG, LOCK_TAG = ".llmprune-tmp-", ".llmprune-old-", ".llmprune-lock"


class TargetBusyError(FileExistsError):
    """Another live process (or thread) is writing the same target."""


def resolve_target(path: str | os.PathLike) -> Path:
    """The absolute path a writer of ``path`` uses (``~`` expanded, parent resolved)."""
    return _normalize(path)


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_TAG}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, killed but not yet reaped, counts as dead)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # platforms without signal 0: assume alive, so nothing is removed
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path, tree: bool = True) -> None:
    """Flush a file, or (``tree``) every file of a directory and the directory itself, so that a crash
    after the rename finds the data and not empty files."""
    paths = [path]
    if tree and path.is_dir():
        paths = [Path(root) / n for root, _, files in os.walk(path) for n in files] + [path]
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # directories cannot be opened on some platforms
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- the lock
_held: dict[tuple[str, int], int] = {}  # (lock path, thread id) -> lock fd held by this thread


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _busy(target: Path, lock: Path, pid: int | None) -> TargetBusyError:
    who = f"process {pid}" if pid else "another process"
    return TargetBusyError(f"output {str(target)!r} is being written by {who} (lock {str(lock)!r}); wait for it "
                           f"to finish or choose another path")


def _take_lock(target: Path) -> int:
    """Exclusive lock of ``target`` for this process: ``flock`` on the lock file (released by the kernel
    when its holder dies, so a dead holder's lock is simply taken over); without ``fcntl``, O_CREAT|O_EXCL
    and a lock of a dead PID is removed."""
    lock = _lock_path(target)
    for _ in range(1000):
        if fcntl is None:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _lock_owner(lock)
                if pid is not None and not pid_alive(pid):
                    log.warning("removing the stale lock %s of process %d, which is no longer running", lock, pid)
                    lock.unlink(missing_ok=True)
                    continue
                raise _busy(target, lock, pid) from None
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(target, lock, _lock_owner(lock)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it between our open and flock: lock the new file instead
                os.close(fd)
                continue
            stale = _lock_owner(lock)
            if stale is not None and stale != os.getpid():
                log.warning("took over the lock %s of process %d, which is no longer running", lock, stale)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise _busy(target, lock, _lock_owner(lock))


def _release(target: Path, fd: int) -> None:
    _lock_path(target).unlink(missing_ok=True)  # before close: a waiter on the old file sees it is gone
    os.close(fd)


# ----------------------------------------------------------------------------------------------- recovery
def _leftovers(target: Path) -> list[tuple[str, int, Path]]:
    """``(tag, pid, path)`` of this target's temporary and old siblings."""
    pat = re.compile(rf"^\.{re.escape(target.name)}\.llmprune-(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [(m[1], int(m[2]), target.parent / n) for n in names if (m := pat.match(n))]


def _recover_locked(target: Path) -> list[str]:
    done = []
    dead = [(tag, pid, p) for tag, pid, p in _leftovers(target) if not pid_alive(pid)]
    olds = sorted((p for tag, _, p in dead if tag == "old"), key=lambda p: p.lstat().st_mtime)
    if olds and not os.path.lexists(target):
        os.rename(olds[-1], target)
        done.append(f"restored {str(target)!r} from {olds[-1].name}, the previous version kept by a process "
                    f"that died while replacing it")
    for tag, pid, p in dead:
        if os.path.lexists(p):
            _remove(p)
            done.append(f"removed {str(p)!r}, left by process {pid} that died while writing {str(target)!r}")
    for msg in done:
        log.warning(msg)
    return done


def recover(path: str | os.PathLike) -> list[str]:
    """Clean up after writers of ``path`` that died: restore the target from a complete old version when a
    replacement died between its renames, and delete the temporary and old siblings of dead processes.

    Every writer does this after taking the target's lock; returns (and logs) what was done.
    Raises TargetBusyError while a live process writes the target.
    """
    target = _normalize(path)
    if (str(_lock_path(target)), threading.get_ident()) in _held:
        return _recover_locked(target)
    if not target.parent.is_dir():
        return []
    fd = _take_lock(target)
    try:
        return _recover_locked(target)
    finally:
        _release(target, fd)


# ------------------------------------------------------------------------------------------- the writers
@contextlib.contextmanager
def reserve(path: str | os.PathLike, *, overwrite: bool, kind: Kind) -> Iterator[Path]:
    """Hold ``path`` for this thread: checked, locked against other writers, leftovers of dead writers
    recovered. Yields the absolute target path.

    Take it before the work that produces the output (a command line reserves ``--output`` before
    pruning), so a second run fails at its start (TargetBusyError, or FileExistsError once the first
    has committed) instead of after its work. ``atomic_dir`` / ``atomic_file`` inside it reuse it.
    """
    target = check_target(path, overwrite=overwrite, kind=kind)
    key = (str(_lock_path(target)), threading.get_ident())
    if key in _held:
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = _take_lock(target)
    _held[key] = fd
    try:
        _recover_locked(target)
        check_target(target, overwrite=overwrite, kind=kind)  # a dead writer's restored target counts
        yield target
    finally:
        del _held[key]
        _release(target, fd)


def _appeared(target: Path) -> FileExistsError:
    return FileExistsError(f"output {str(target)!r} was created by another writer while this one was being "
                           f"written; nothing was replaced ({_HINT} to replace it)")


def _commit(target: Path, tmp: Path, *, overwrite: bool) -> None:
    """Move the complete ``tmp`` to ``target``; replace an existing target only when ``overwrite``."""
    _fsync(tmp)
    exists = os.path.lexists(target)
    if exists and not overwrite:  # created meanwhile by a writer outside this protocol: never replaced
        raise _appeared(target)
    if tmp.is_dir():
        if exists:
            old = _sibling(target, OLD_TAG)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            trash = _sibling(target, TMP_TAG)
            os.rename(old, trash)  # an old name always means a complete tree; this one is garbage now
            _remove(trash)
        else:
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise _appeared(target) from exc
                raise
    elif exists:
        os.replace(tmp, target)  # one atomic rename for a file
    else:
        try:
            os.link(tmp, target)  # fails if the target appeared meanwhile: never replaces it
        except FileExistsError:
            raise _appeared(target) from None
        except OSError:  # no hard links on this file system
            os.rename(tmp, target)
        tmp.unlink(missing_ok=True)
    _fsync(target.parent, tree=False)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Write a directory: yields an empty temporary sibling; on normal exit it becomes ``path`` (replacing
    an existing directory only when ``overwrite``); on an error it is deleted and ``path`` is untouched."""
    with reserve(path, overwrite=overwrite, kind="dir") as target:
        tmp = _sibling(target, TMP_TAG)
        tmp.mkdir()
        try:
            yield tmp
            _commit(target, tmp, overwrite=overwrite)
        finally:
            if os.path.lexists(tmp):
                _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Write a file: yields a temporary sibling path (not yet created) to write; on normal exit it becomes
    ``path`` (replacing an existing file only when ``overwrite``); on an error it is deleted."""
    with reserve(path, overwrite=overwrite, kind="file") as target:
        tmp = _sibling(target, TMP_TAG)
        try:
            yield tmp
            if not tmp.is_file():
                raise FileNotFoundError(f"nothing was written to {str(tmp)!r}, the temporary file for "
                                        f"{str(target)!r}; write the content to the yielded path")
            _commit(target, tmp, overwrite=overwrite)
        finally:
            if os.path.lexists(tmp):
                _remove(tmp)
