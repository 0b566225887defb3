"""The ``llmprune`` command on a tiny saved model: prune, report, save, eval, and clear errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model

from llmprune_kernels.cli import build_parser, main


@pytest.fixture
def tiny_dir(cli_model_dir):
    return cli_model_dir


def _args(root, *extra):
    return [str(root / "model"), "--text", str(root / "text.txt"), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "-q", *extra]


def test_prune_writes_report_and_model(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out, rep = tmp_path / "pruned", tmp_path / "report.json"
    rc = main(["prune", *_args(tiny_dir, "--method", "wanda", "--sparsity", "0.5", "--output", str(out),
                                "--report", str(rep))])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity:       dense" in printed and "-> pruned" in printed and "time:" in printed
    report = json.loads(rep.read_text())
    assert report["method"] == "wanda" and report["sparsity"]["label"] == "0.5"
    assert report["data"]["nsamples"] == 4 and report["data"]["source"] == "files (split)"
    assert report["perplexity"]["dense"] > 1 and report["perplexity"]["pruned"] > 1
    assert len(report["linears"]) == 14 and all(s["sparsity"] == 0.5 for s in report["linears"])
    assert all(0 < s["rel_error"] < 1.5 and s["time_s"] >= 0 for s in report["linears"])
    assert {"load", "prune", "eval_dense", "eval_pruned", "total"} <= set(report["timings_s"])
    assert set(report["backends"]) == {"cpp", "cuda", "triton", "dense", "decode", "cusparselt", "mmasp", "cutlass",
                                      "decode8", "mmasp8", "cslt8"}
    assert report["versions"]["torch"] == torch.__version__
    assert json.loads((out / "pruning_report.json").read_text())["method"] == "wanda"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    q = reloaded.model.layers[1].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()


def test_prune_pattern_without_eval(tiny_dir, capsys):
    rc = main(["prune", *_args(tiny_dir, "--method", "magnitude", "--pattern", "2:4", "--no-eval")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "N:M pattern held: True" in printed and "perplexity" not in printed


def test_method_options_pass_through(tiny_dir, tmp_path, capsys):
    rep = tmp_path / "r.json"
    assert main(["prune", *_args(tiny_dir, "--method", "sparsegpt", "--option", "blocksize=32", "--option",
                                 "percdamp=0.05", "--option", "tf32=false", "--no-eval", "--report", str(rep))]) == 0
    # The report records the validated options with every default filled in.
    assert json.loads(rep.read_text())["options"] == {"blocksize": 32, "percdamp": 0.05, "max_retries": 4,
                                                      "backend": "auto", "tf32": False, "fast_inverse": None,
                                                      "threshold": "exact", "quantize": "none"}
    assert "options:          blocksize=32, percdamp=0.05, max_retries=4" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse usage error, exit status 2
        main(["prune", *_args(tiny_dir, "--option", "no_equals_sign")])


@pytest.mark.parametrize("option, message", [
    ("blocksise=32", r"unknown option 'blocksise' for method 'sparsegpt' \(did you mean 'blocksize'\?\); "
                     r"allowed: blocksize \(int\), percdamp \(float\), max_retries \(int\)"),
    ("blocksize=abc", r"option blocksize='abc' of method 'sparsegpt' is not of type int; allowed: blocksize"),
    ("blocksize=1.5", r"option blocksize=1.5 of method 'sparsegpt' is not of type int"),
    ("backend=fast", r"option backend='fast' .* is not of type 'auto' \| 'reference' \| 'ext'"),
])
def test_bad_method_option_fails_before_loading(tiny_dir, capsys, monkeypatch, option, message):
    import re

    import llmprune_kernels.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the options check"))
    assert main(["prune", *_args(tiny_dir, "--method", "sparsegpt", "--option", option)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmprune: error: ") and re.search(message, err), err


def test_eval_command(tiny_dir, tmp_path, capsys):
    rep = tmp_path / "e.json"
    assert main(["eval", str(tiny_dir / "model"), "--text", str(tiny_dir / "text.txt"), "--seqlen", "32", "-q",
                 "--report", str(rep)]) == 0
    assert "perplexity:" in capsys.readouterr().out
    report = json.loads(rep.read_text())
    assert report["method"] is None and report["perplexity"]["dense"] > 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.5"], r"sparsity 1.5 is outside the allowed range \[0, 1\)"),
        (["--pattern", "4:2"], r"N:M pattern 4:2 is invalid: allowed 1 <= N < M"),
        (["--pattern", "2-4"], r"pattern '2-4' is not of the form N:M"),
        (["--method", "nope"], r"unknown pruning method 'nope'; allowed:"),
        (["--seqlen", "100000"], r"calibration text has \d+ tokens, fewer than one window of seqlen=100000"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_dir, capsys, extra, message):
    import re

    assert main(["prune", *_args(tiny_dir, *extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmprune: error: ") and re.search(message, err), err


def test_empty_text_and_existing_output(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["prune", str(tiny_dir / "model"), "--text", str(empty), "-q", "--nsamples", "2"]) == 2
    assert "text is empty; calibration and evaluation need non-empty text" in capsys.readouterr().err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["prune", *_args(tiny_dir, "--output", str(existing))]) == 2
    assert "already exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err


def _no_load(monkeypatch):
    import llmprune_kernels.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the path check"))


def _one_error_line(capsys, pattern: str) -> str:
    import re

    err = capsys.readouterr().err
    assert err.startswith("llmprune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


def test_output_and_report_paths_are_checked_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    cases = [
        (["--output", str(a_file / "out")], r"cannot create output directory .*a_file.* is a file, not a directory"),
        (["--output", str(a_file)], r"output .*a_file' exists and is not a directory"),
        (["--report", str(a_dir)], r"output .*a_dir' exists and is a directory; give a file path"),
        (["--report", str(a_file / "r.json")], r"cannot create output file .* is a file, not a directory"),
        (["--output", str(tmp_path / "new"), "--report", str(tmp_path / "new")],
         r"--report .* names the --output directory; allowed: a file path"),
        (["--text", str(tmp_path / "missing.txt")], r"--text file .*missing.txt' does not exist or is not a file"),
    ]
    for extra, pattern in cases:
        assert main(["prune", *_args(tiny_dir, *extra)]) == 2, extra
        _one_error_line(capsys, pattern)
    assert main(["eval", str(tiny_dir / "model"), "--report", str(a_dir)]) == 2
    _one_error_line(capsys, r"exists and is a directory")


def test_unwritable_output_is_checked_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("directory permissions do not apply to this user (root)")
        _no_load(monkeypatch)
        assert main(["prune", *_args(tiny_dir, "--output", str(locked / "out"))]) == 2
        _one_error_line(capsys, r"directory .*locked' is not writable")
    finally:
        locked.chmod(0o700)


def test_garbage_config_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{this is not json")
    assert main(["eval", str(bad), "-q"]) == 2
    _one_error_line(capsys, r"config\.json' is not a valid JSON file")
    with pytest.raises(OSError, match="not a valid JSON file"):
        main(["eval", str(bad), "-q", "--debug"])
    with pytest.raises(OSError, match="not a valid JSON file"):
        main(["--debug", "eval", str(bad), "-q"])


def test_ctrl_c_is_one_line_and_exit_130(tiny_dir, capsys, monkeypatch):
    import llmprune_kernels.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    assert main(["prune", *_args(tiny_dir)]) == 130
    assert capsys.readouterr().err == "llmprune: interrupted\n"


def test_a_failure_while_running_is_one_line(tiny_dir, capsys, monkeypatch):
    import llmprune_kernels.cli as cli

    def fails(args):
        raise RuntimeError("Cholesky failed\nafter 4 retries")

    monkeypatch.setattr(cli, "_load", fails)
    assert main(["prune", *_args(tiny_dir)]) == 1
    _one_error_line(capsys, r"RuntimeError: Cholesky failed after 4 retries \(rerun with --debug for the traceback\)")


def test_eval_windows_error_names_the_flag(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", *_args(tiny_dir, "--eval-windows", "-1")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --eval-windows: -1 is invalid; allowed: an integer >= 0" in err
    assert "max_windows" not in err


def test_windows_longer_than_the_model_positions(tiny_dir, capsys):
    # the tiny model has max_position_embeddings=256
    assert main(["prune", *_args(tiny_dir, "--seqlen", "300", "--no-eval")]) == 2
    _one_error_line(capsys, r"calibration windows are 300 tokens long, longer than the model's "
                            r"max_position_embeddings 256; allowed: a sequence length <= 256")
    assert main(["eval", str(tiny_dir / "model"), "--text", str(tiny_dir / "text.txt"), "--seqlen", "300", "-q"]) == 2
    _one_error_line(capsys, r"evaluation windows are 300 tokens long")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_help_names_paper_settings(capsys):
    text = _help(capsys, "prune")
    assert "128" in text and "2048" in text and "--pattern" in text


def test_help_is_plain_text_with_examples(capsys):
    """No reST/markdown or %-escapes reach the terminal; examples, where the options are listed, --version."""
    import llmprune_kernels

    top, prune, ev = _help(capsys), _help(capsys, "prune"), _help(capsys, "eval")
    for text in (top, prune, ev, _help(capsys, "methods")):
        assert "``" not in text and "%%" not in text and "**" not in text and "%(" not in text, text
    for text in (top, prune):
        assert "examples:" in text and text.count("\n  llmprune ") >= 4
        assert "llmprune methods" in text
    assert "20%" in prune and "sparsegpt: blocksize, percdamp" in prune and "magnitude: threshold" in prune
    assert "SmolLM2-135M-Instruct" in ev
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"llmprune {llmprune_kernels.__version__}"


def test_methods_command_lists_every_option(capsys):
    from llmprune_kernels.methods import available_methods, method_options

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in available_methods():
        assert f"\n{name}: " in f"\n{text}", name
        for o in method_options(name):
            assert f"  {o.name} ({o.type}, default {o.default!r})" in text and o.doc[:30] in text
    assert "blocksize (int, default 128)" in text and "threshold ('exact' | 'published', default 'exact')" in text
    assert main(["methods", "wanda"]) == 0
    assert capsys.readouterr().out.startswith("wanda: ")
    assert main(["methods", "nope"]) == 2 and "unknown pruning method 'nope'" in capsys.readouterr().err


def test_one_default_batch_size():
    """CLI, prune_model, the capture, OWL and perplexity share one default (different batches round differently)."""
    import inspect

    from llmprune_kernels.pipeline import evaluate, layerwise, owl, prune_model
    from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE

    cli_default = build_parser().parse_args(["prune"]).batch_size
    assert cli_default is DEFAULT_BATCH_SIZE and build_parser().parse_args(["eval"]).batch_size is DEFAULT_BATCH_SIZE
    for fn in (prune_model, layerwise.capture_layer_inputs, owl.collect_outlier_ratios, owl.owl_layer_sparsity,
               evaluate.nll_sum):
        assert inspect.signature(fn).parameters["batch_size"].default is DEFAULT_BATCH_SIZE, fn.__name__


def test_slow_cpu_paths_get_a_cost_note():
    from llmprune_kernels.cli import _cost_note
    from llmprune_kernels.methods import get_method
    from llmprune_kernels.validation import SparsityConfig

    cpu, half, two_four = torch.device("cpu"), SparsityConfig(0.5), SparsityConfig(n=2, m=4)
    assert "sparsellm 0.5 on CPU may take about 45 minutes for the default model" in \
        _cost_note(get_method("sparsellm"), half, cpu, None)
    assert "may take about 8 minutes" in _cost_note(get_method("sparsegpt"), two_four, cpu, None)
    assert _cost_note(get_method("sparsegpt"), half, cpu, None) is None
    assert _cost_note(get_method("sparsellm"), half, torch.device("cuda"), None) is None
    assert _cost_note(get_method("sparsellm"), half, cpu, "some/model") is None  # estimates hold for the default
    assert _cost_note(get_method("wanda"), two_four, cpu, None) is None


def test_console_script_is_installed():
    exe = shutil.which("llmprune")
    if exe is None:
        pytest.skip("the llmprune entry point is not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "prune" in out and "eval" in out
    out = subprocess.run([sys.executable, "-m", "llmprune_kernels.cli", "eval", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--eval-windows" in out


def test_report_json_is_strict(tmp_path):
    from tiny_models import random_ids

    from llmprune_kernels.pipeline import prune_model
    from llmprune_kernels.pipeline.report import build_report, write_json
    from llmprune_kernels.validation import SparsityConfig

    result = prune_model(tiny_model("llama"), random_ids(2, 16), "wanda", SparsityConfig(n=2, m=4), progress=False)
    report = build_report(model="tiny", method="wanda", prune_result=result, dense_ppl=12.5, pruned_ppl=float("inf"),
                          timings={"total": 1.0})
    path = write_json(report, tmp_path / "sub" / "r.json")
    text = path.read_text()
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded["perplexity"] == {"dense": 12.5, "pruned": "inf"}
    assert loaded["overall_sparsity"] == 0.5 and all(s["nm_ok"] for s in loaded["linears"])
    assert loaded["timings_s"]["total"] == 1.0 and "prune" in loaded["timings_s"]
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind
