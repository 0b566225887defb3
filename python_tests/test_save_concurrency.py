"""Saves under SIGKILL and concurrent writers, with real processes.

* kill: a process saving a tiny model in a loop is killed at random moments; after every kill the target
  is absent or complete, and the next save (or ``recover``) restores and cleans up what was left;
* race: two processes take one target without overwrite: for each target exactly one does the work.
"""
from __future__ import annotations

import os
import random
import re
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from tiny_models import tiny_model

from llmprune_kernels.atomic import recover
from llmprune_kernels.pipeline.save import save_model

TESTS = Path(__file__).resolve().parent
# A forking server: it imports and builds the model once, then forks one saving child per round, so a
# round costs a fork instead of a Python start. One torch thread, so the fork holds no thread pool.
SERVER = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from tiny_models import tiny_model, tiny_tokenizer
    from llmprune_kernels.pipeline.save import save_model
    model, tok = tiny_model("llama"), tiny_tokenizer()
    target, scratch = sys.argv[1], sys.argv[2]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        save_model(model, tok, scratch, overwrite=True)
        times.append(time.perf_counter() - t0)
    print("time", sorted(times)[1], flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    while True:
                        save_model(model, tok, target, overwrite=True)
                finally:
                    os._exit(1)
            print("pid", pid, flush=True)
        elif cmd[0] == "reap":
            os.waitpid(int(cmd[1]), 0)
            print("reaped", flush=True)
""")
PROTOCOL = re.compile(r"^\.out\.llmprune-(tmp-\d+-[0-9a-f]{8}|old-\d+-[0-9a-f]{8}|lock)$")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _readline(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise AssertionError(f"the saving server stopped answering (exit {proc.poll()}): {proc.stderr.read()}")
    return line.split()


def _assert_complete(target: Path, expected: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(target)
    state = loaded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    assert AutoTokenizer.from_pretrained(target)("hello")["input_ids"]


def test_killed_saves_leave_a_complete_target_or_none(tmp_path):
    rounds, seed = 24, random.randrange(2**32)
    rng = random.Random(seed)
    target = tmp_path / "out"
    expected = tiny_model("llama").state_dict()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(target), str(tmp_path / "scratch" / "s")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env())
    try:
        save_time = float(_readline(server)[1])
        committed, left, half_replaced = False, 0, 0
        for i in range(rounds):
            server.stdin.write("fork\n")
            server.stdin.flush()
            pid = int(_readline(server)[1])
            select.select([], [], [], rng.uniform(0, 2.5 * save_time))  # a random moment of the save loop
            os.kill(pid, signal.SIGKILL)
            server.stdin.write(f"reap {pid}\n")
            server.stdin.flush()
            assert _readline(server) == ["reaped"]
            others = [n for n in os.listdir(tmp_path) if n not in ("out", "scratch")]
            assert all(PROTOCOL.match(n) for n in others), (seed, others)  # nothing but the protocol's own siblings
            left += any(PROTOCOL.match(n) and "lock" not in n for n in others)
            if target.exists():
                _assert_complete(target, expected)
                committed = True
            else:
                half_replaced += committed
            if i % 2:  # odd rounds: recover here; even rounds: the next child's save cleans up
                recover(target)
                assert sorted(os.listdir(tmp_path)) == (["out", "scratch"] if committed else ["scratch"])
                if committed:
                    _assert_complete(target, expected)
    finally:
        server.kill()
        server.wait()
    save_model(tiny_model("llama"), None, target, overwrite=True)  # the next save cleans up the last kill
    assert sorted(os.listdir(tmp_path)) == ["out", "scratch"]
    print(f"{rounds} kills: {left} left temporary or old siblings, {half_replaced} a missing target")


RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from tiny_models import tiny_model
    from llmprune_kernels.atomic import reserve
    from llmprune_kernels.pipeline.save import save_model
    model, root, n = tiny_model("llama"), Path(sys.argv[1]), int(sys.argv[2])
    (root / f"ready-{os.getpid()}").touch()
    while len(list(root.glob("ready-*"))) < 2:
        time.sleep(0.01)
    for i in range(n):
        target = root / f"out{i}"
        try:
            if i % 2:  # a plain save_model: refused when the target is taken or appeared
                save_model(model, None, target)
            else:  # the command line's way: reserve first, then work, then save
                with reserve(target, overwrite=False, kind="dir"):
                    (root / f"work{i}-{os.getpid()}").touch()
                    save_model(model, None, target)
            print(i, "ok", flush=True)
        except FileExistsError as exc:
            print(i, "refused", type(exc).__name__, flush=True)
""")


def test_two_processes_one_target_exactly_one_wins(tmp_path):
    n = 12
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [dict(line.split(None, 1) for line in out.splitlines()) for out, _ in outs]
    for i in range(n):
        got = sorted(r[str(i)].split()[0] for r in results)
        assert got == ["ok", "refused"], (i, results)
        winner = procs[[r[str(i)] for r in results].index("ok")].pid
        if i % 2 == 0:  # the loser failed at reserve, before its work
            assert sorted(p.name for p in tmp_path.glob(f"work{i}-*")) == [f"work{i}-{winner}"]
        assert (tmp_path / f"out{i}" / "config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
