"""``llmprune prune --stream`` / ``--resume`` / ``--gpu-memory``, and ``--output`` held for the whole run."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

from llmprune_kernels import SparsityConfig, prune_pretrained
from llmprune_kernels.atomic import reserve
from llmprune_kernels.cli import main
from llmprune_kernels.pipeline import data
from llmprune_kernels.pipeline.resume import work_dir_for


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_stream")
    tiny_model("llama").save_pretrained(root / "model", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(SAMPLE_TEXT * 30)
    return root


def _args(root, *extra):
    return ["prune", str(root / "model"), "--text", str(root / "text.txt"), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "-q", *extra]


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_stream_equals_the_api_and_writes_the_stage_table(tiny_dir, tmp_path, capsys):
    out = tmp_path / "streamed"
    rc = main(_args(tiny_dir, "--stream", "--method", "wanda", "--pattern", "2:4", "--output", str(out),
                    "--gpu-memory", "1GB"))
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "N:M pattern held: True" in printed.out and "perplexity" not in printed.out
    assert "llmprune eval" not in printed.err  # -q: no note
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["stage_times_s"]["load"] > 0 and report["stage_times_s"]["solve"] > 0
    assert not work_dir_for(out).exists()
    # the same windows through the API give the same weights
    tok = tiny_tokenizer()
    text = data.load_text([str(tiny_dir / "text.txt")], None)
    ids = data.calibration_windows(data.tokenize(tok, text.calibration, "calibration text"), 4, 32, 0)
    prune_pretrained(tiny_dir / "model", tmp_path / "api", ids, "wanda", SparsityConfig.parse(None, "2:4"),
                     progress=False)
    a, b = _load(out).state_dict(), _load(tmp_path / "api").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse rejects a malformed value itself
        return exc.code


@pytest.mark.parametrize("extra, message", [
    (["--stream"], "needs --output"),
    (["--resume"], "needs --output"),
    (["--stream", "--owl", "--output", "X"], "--owl"),
    (["--gpu-memory", "lots"], "memory size 'lots' is invalid"),
])
def test_bad_stream_arguments_fail_before_work(tiny_dir, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / e) if e == "X" else e for e in extra]
    assert _exit_code(_args(tiny_dir, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_an_output_in_use_fails_at_the_start(tiny_dir, tmp_path, capsys, monkeypatch, stream):
    """A second run on an --output another run is writing stops before loading or pruning anything."""
    import llmprune_kernels.cli as cli

    out = tmp_path / "busy"
    holding, release = threading.Event(), threading.Event()

    def hold():
        with reserve(out, overwrite=False, kind="dir"):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(60)
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda *a: loaded.append(a) or pytest.fail("model loaded"))
    try:
        rc = main(_args(tiny_dir, "--output", str(out), *(["--stream"] if stream else [])))
    finally:
        release.set()
        holder.join()
    assert rc == 2 and not loaded
    assert "llmprune: error:" in capsys.readouterr().err
    assert not out.exists()


def test_resume_continues_a_killed_in_memory_run(tiny_dir, tmp_path, capsys, monkeypatch):
    """In memory with --output, each layer is checkpointed; --resume after a crash gives the same model."""
    from llmprune_kernels.pipeline import resume

    ref = tmp_path / "ref"
    assert main(_args(tiny_dir, "--method", "sparsegpt", "--no-eval", "--output", str(ref))) == 0
    out = tmp_path / "out"
    original = resume.Checkpoint.save_layer

    def crash(self, index, *a, **k):
        original(self, index, *a, **k)
        if index == 0:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(resume.Checkpoint, "save_layer", crash)
    assert main(_args(tiny_dir, "--method", "sparsegpt", "--no-eval", "--output", str(out))) == 1
    assert not out.exists() and work_dir_for(out).exists()
    monkeypatch.setattr(resume.Checkpoint, "save_layer", original)
    assert main(_args(tiny_dir, "--method", "sparsegpt", "--no-eval", "--output", str(out))) == 2  # no --resume
    assert "--resume" in capsys.readouterr().err
    assert main(_args(tiny_dir, "--method", "sparsegpt", "--no-eval", "--output", str(out), "--resume")) == 0
    a, b = _load(out).state_dict(), _load(ref).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not work_dir_for(out).exists()
