"""One commit protocol for every file or directory the package writes.

A writer never writes under the target name: it writes into a temporary sibling named after the target
and the writing process, ``.NAME.llmprune-tmp-PID-RAND``, and renames it into place when complete.
``check_target`` is the preflight check (no writes) that a command line runs before any work.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

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
