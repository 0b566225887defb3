"""The commit protocol every writer uses: preflight check, exclusive lock, recovery after dead writers."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from llmprune_kernels import atomic
from llmprune_kernels.atomic import TargetBusyError, atomic_dir, atomic_file, check_target, recover, reserve


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def names(parent) -> list[str]:
    return sorted(os.listdir(parent))


# ---------------------------------------------------------------------------------------- check_target
def test_check_target_expands_home_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_target("~/a/b", overwrite=False, kind="dir") == tmp_path / "a" / "b"
    assert names(tmp_path) == []


@pytest.mark.parametrize("make, kind, overwrite, error, match", [
    ("dir", "dir", False, FileExistsError, r"already exists; pass overwrite=True \(CLI: --overwrite\)"),
    ("file", "file", False, FileExistsError, r"already exists; pass overwrite=True"),
    ("file", "dir", True, NotADirectoryError, "exists and is not a directory"),
    ("dir", "file", True, FileExistsError, "exists and is a directory; give a file path"),
])
def test_check_target_refuses(tmp_path, make, kind, overwrite, error, match):
    target = tmp_path / "t"
    target.mkdir() if make == "dir" else target.write_text("x")
    with pytest.raises(error, match=match) as info:
        check_target(target, overwrite=overwrite, kind=kind)
    assert str(target) in str(info.value)


def test_check_target_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"'.*/f' is a file, not a directory"):
        check_target(tmp_path / "f" / "sub" / "out", overwrite=True, kind="dir")
    with pytest.raises(ValueError, match="allowed: 'dir' or 'file'"):
        check_target(tmp_path / "x", overwrite=True, kind="folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_check_target_unwritable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match="is not writable"):
        check_target(ro / "out", overwrite=False, kind="dir")


# -------------------------------------------------------------------------------------------- writers
def test_atomic_dir_commits_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, overwrite=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.llmprune-tmp-{os.getpid()}-")
        (tmp / "a").write_text("1")
        assert not target.exists()
    assert names(target) == ["a"] and names(tmp_path) == ["out"]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert names(target) == ["a"] and names(tmp_path) == ["out"]
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert names(target) == ["b"] and names(tmp_path) == ["out"]


def test_atomic_file_never_replaces_a_file_that_appeared(tmp_path):
    target = tmp_path / "r.json"
    with pytest.raises(FileExistsError, match="created by another writer while this one was being written; nothing was replaced"):
        with atomic_file(target, overwrite=False) as tmp:
            tmp.write_text("mine")
            target.write_text("theirs")  # another program, outside the protocol
    assert target.read_text() == "theirs" and names(tmp_path) == ["r.json"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_file(tmp_path / "empty.json", overwrite=False):
            pass
    assert names(tmp_path) == ["r.json"]


def test_write_json_and_tuning_table_use_the_protocol(tmp_path):
    from llmprune_kernels.pipeline.report import write_json
    from llmprune_kernels.sparse24.dispatch import TuningTable

    path = write_json({"a": 1}, tmp_path / "r.json")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        write_json({"a": 2}, path, overwrite=False)
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(RecursionError):
        write_json(loop, path)  # cannot be serialised: the existing report stays
    assert json.loads(path.read_text()) == {"a": 1}
    TuningTable(device_name="x").save(tmp_path / "t.json")
    with pytest.raises(FileExistsError, match="already exists"):
        TuningTable().save(tmp_path / "t.json", overwrite=False)
    assert TuningTable.load(tmp_path / "t.json").device_name == "x"
    assert names(tmp_path) == ["r.json", "t.json"]
    (tmp_path / "t.json").write_text('{"entries": {"64x128:float16": {"1": {"times_ms": {}}}}}')
    with pytest.raises(ValueError, match=r"t.json'.*entries\['64x128:float16'\]\['1'\]: KeyError"):
        TuningTable.load(tmp_path / "t.json")


# ------------------------------------------------------------------------------------ lock and recovery
def test_a_second_writer_fails_before_its_work(tmp_path):
    target, held, done = tmp_path / "out", threading.Event(), threading.Event()

    def first():
        with reserve(target, overwrite=True, kind="dir"):
            held.set()
            done.wait(30)

    t = threading.Thread(target=first)
    t.start()
    held.wait(30)
    try:
        for overwrite in (False, True):
            with pytest.raises(TargetBusyError, match=rf"is being written by process {os.getpid()}"):
                with atomic_dir(target, overwrite=overwrite):
                    pytest.fail("the second writer must not start")
    finally:
        done.set()
        t.join()
    assert names(tmp_path) == []  # the lock is gone with its holder


def test_reserve_is_reentrant_within_a_thread(tmp_path):
    target = tmp_path / "out"
    with reserve(target, overwrite=False, kind="dir") as t:
        with atomic_dir(t, overwrite=False) as tmp:
            (tmp / "x").write_text("1")
    assert names(tmp_path) == ["out"]


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    (tmp_path / ".out.llmprune-lock").write_text(f"{pid}\n")
    with caplog.at_level(logging.WARNING, "llmprune_kernels"):
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "x").write_text("1")
    assert f"process {pid}, which is no longer running" in caplog.text
    assert names(tmp_path) == ["out"]


def test_recovery_restores_a_half_replaced_target_and_removes_dead_leftovers(tmp_path, caplog):
    pid = dead_pid()
    old = tmp_path / f".out.llmprune-old-{pid}-0123abcd"  # renamed away, its replacement never arrived
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    partial = tmp_path / f".out.llmprune-tmp-{pid}-89abcdef"
    partial.mkdir()
    (partial / "model.safetensors").write_text("half")
    other = tmp_path / f".other.llmprune-tmp-{pid}-89abcdef"  # another target's: not this one's to touch
    other.mkdir()
    (tmp_path / "unrelated.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, "llmprune_kernels"):
        # the next writer without overwrite finds the restored target and refuses to replace it
        with pytest.raises(FileExistsError, match="already exists"):
            with atomic_dir(tmp_path / "out", overwrite=False):
                pytest.fail("must not start")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "previous"
    assert names(tmp_path) == sorted(["out", other.name, "unrelated.txt"])
    assert "restored" in caplog.text and f"left by process {pid}" in caplog.text
    assert recover(tmp_path / "out") == []


def test_leftovers_of_live_processes_are_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".out.llmprune-tmp-{live.pid}-0123abcd"
        theirs.mkdir()
        assert recover(tmp_path / "out") == []
        assert theirs.is_dir()
    finally:
        live.kill()
        live.wait()
    assert len(recover(tmp_path / "out")) == 1 and names(tmp_path) == []


def test_pid_alive():
    assert atomic.pid_alive(os.getpid()) and not atomic.pid_alive(dead_pid())
