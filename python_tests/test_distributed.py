"""Several processes through torch.distributed (gloo on CPU): the same pruned weights as one process, bit for bit.

Two processes are spawned once: each makes the API runs (``prune_model``, ``prune_pretrained``), then runs the
command line with the environment ``torchrun`` gives its workers (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``,
...). The one-process references run here with the same thread count (1, as torchrun gives each worker),
since a CPU GEMM's summation may depend on it. Batches hold 4 x 64 = 256 tokens:
there the CPU's fused Hessian update ``addmm_(S, x^T, x)`` differs from ``S + x^T x`` in the last bits, so
only a reduction that replays the one-process operations gives equal masks.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import random_ids, tiny_model, tiny_tokenizer
from torch import nn

from llmprune_kernels import SparsityConfig, prune_model, prune_pretrained
from llmprune_kernels.pipeline.distributed import assign, rank_batches

# 10 windows in batches of 4: 3 batches (4, 4, 2), so rank 0 has two and rank 1 one (an uneven last round).
WINDOWS, SEQLEN, BATCH = 10, 64, 4
RUNS = [("wanda", SparsityConfig(0.5)), ("wanda", SparsityConfig(n=2, m=4)),
        ("sparsegpt", SparsityConfig(0.5)), ("sparsegpt", SparsityConfig(n=2, m=4))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _linears(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n}


def _lines(result) -> list[tuple]:
    return [(s.name, s.sparsity, s.nm_ok, s.rel_error) for s in result.linears]


def _api_runs(source: Path, out: Path | None) -> dict:
    """Every API run of this test; ``out``: where prune_pretrained writes (None: not run)."""
    ids = random_ids(WINDOWS, SEQLEN, seed=5)
    got = {}
    for method, config in RUNS:
        model = tiny_model("qwen2")  # q/k/v biases: the error terms see them too
        result = prune_model(model, ids, method, config, batch_size=BATCH, progress=False)
        got[f"{method} {config.label}"] = (_linears(model), _lines(result))
    model = tiny_model("llama")  # the feed-forward blocks keep their inputs (add_batch): rank 0 prunes them
    result = prune_model(model, ids, "sparsellm", SparsityConfig(0.5), batch_size=BATCH, options={"iterations": 2},
                         progress=False)
    got["sparsellm"] = (_linears(model), _lines(result))
    model = tiny_model("llama")
    result = prune_model(model, None, "magnitude", SparsityConfig(0.5), progress=False)  # no forward pass
    got["magnitude"] = (_linears(model), _lines(result))
    if out is not None:
        result = prune_pretrained(source, out, ids, "sparsegpt", SparsityConfig(n=2, m=4), batch_size=BATCH,
                                  progress=False)
        got["stream"] = (None, _lines(result))
    return got


def _cli_args(source: Path, text: Path, out: Path) -> list[str]:
    return ["prune", str(source), "--method", "sparsegpt", "--pattern", "2:4", "--device", "cpu", "--text", str(text),
            "--nsamples", "6", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--output", str(out)]


def _worker(rank: int, world: int, ports: tuple[int, int], folder: str) -> None:
    """One process: the API runs, then the command line as torchrun starts it (its environment variables)."""
    from llmprune_kernels.cli import main

    torch.set_num_threads(1)
    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        got = _api_runs(root / "source", root / "two")
    finally:
        dist.destroy_process_group()
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[1]))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*_cli_args(root / "source", root / "calib.txt", root / "cli-two"), "--report",
                     str(root / "cli-two.json")])
    torch.save({"api": got, "cli": (code, stdout.getvalue())}, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the one-process results, each rank's results, the folder); both runs write into the folder."""
    from llmprune_kernels.cli import main

    root = tmp_path_factory.mktemp("distributed")
    tiny_model("llama").save_pretrained(root / "source", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(root / "source")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. def add(a, b): return a + b\n" * 200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expect = _api_runs(root / "source", root / "one")
        assert main([*_cli_args(root / "source", root / "calib.txt", root / "cli-one"), "-q"]) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, (_free_port(), _free_port()), str(root)), nprocs=2, join=True)
    return expect, [torch.load(root / f"rank{r}.pt") for r in range(2)], root


def test_two_processes_prune_as_one(runs):
    expect, ranks, _ = runs
    for rank, got in enumerate(ranks):  # every rank ends with the whole pruned model
        got = got["api"]
        assert expect.keys() == got.keys()
        for key, (weights, lines) in expect.items():
            assert got[key][1] == lines, (rank, key)  # sparsity, N:M, reconstruction error: the same floats
            for name, w in (weights or {}).items():
                assert torch.equal(got[key][0][name], w), (rank, key, name)  # weights (so masks) bit for bit


def _same_files(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in shards:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_streamed_output_is_written_once_by_rank_zero(runs):
    _, _, root = runs
    _same_files(root / "one", root / "two")
    assert not [p.name for p in root.iterdir() if "llmprune" in p.name]  # no work directory or lock left


def test_command_line_under_torchrun(runs):
    _, ranks, root = runs
    (code0, out0), (code1, out1) = ranks[0]["cli"], ranks[1]["cli"]
    assert code0 == code1 == 0
    assert "perplexity:" in out0 and "saved to:" in out0 and out1 == ""  # rank 0 alone prints
    _same_files(root / "cli-one", root / "cli-two")
    one = json.loads((root / "cli-one" / "pruning_report.json").read_text())
    two = json.loads((root / "cli-two.json").read_text())
    assert [(s["name"], s["rel_error"]) for s in one["linears"]] == [(s["name"], s["rel_error"]) for s in two["linears"]]
    assert one["perplexity"] == two["perplexity"]


def test_batches_and_linears_are_shared_out_deterministically():
    assert [rank_batches(5, 2, r) for r in range(2)] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="2 calibration batch.* cannot be shared by 4 processes"):
        rank_batches(2, 4, 0)
    costs = [("q", 4.0), ("k", 1.0), ("v", 1.0), ("o", 4.0), ("up", 8.0)]
    plan = assign(costs, 2)
    assert plan == {"up": 0, "q": 1, "o": 1, "k": 0, "v": 1}  # largest first, to the least loaded rank
    assert assign(costs, 2, fixed={"q": 0, "k": 0}) == {"q": 0, "k": 0, "up": 1, "o": 0, "v": 1}
    assert set(assign(costs, 8).values()) == {0, 1, 2, 3, 4}
