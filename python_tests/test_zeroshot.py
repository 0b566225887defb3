"""Zero-shot accuracy through lm-evaluation-harness, offline, on a custom task over a local JSON-lines file.

The task (``dataset_path: json``) and the tiny random models need no network and no Hugging Face cache.
The accuracy is checked against the same log-likelihood comparison computed here with the model itself,
so the test pins that lm-eval scores the in-memory model (pruned or not), not a copy loaded elsewhere.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from llmprune_kernels.cli import main

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed: pip install "
                                                           "'llmprune_kernels[eval]' (the test extra has it)")

TASK = "llmprune_tiny_choice"
# Every choice is two tokens of the tiny tokenizer, so the tiny random models' scores do not just follow
# the choices' lengths (test_docs_choices_have_equal_length).
DOCS = [
    {"question": "The quick brown fox jumps over the lazy", "choices": ["dog", "box", "five"], "label": 0},
    {"question": "Pack my", "choices": ["fox", "box", "add"], "label": 1},
    {"question": "def", "choices": ["jugs", "black", "add"], "label": 2},
    {"question": "Sphinx of", "choices": ["black", "dog", "five"], "label": 0},
    {"question": "with", "choices": ["jugs", "five", "fox"], "label": 1},
    {"question": "liquor", "choices": ["box", "add", "jugs"], "label": 2},
    {"question": "The quick brown", "choices": ["fox", "dog", "black"], "label": 0},
    {"question": "judge my", "choices": ["five", "box", "dog"], "label": 2},
]


def _task_yaml(data_file, task=TASK, dataset_path="json"):
    kwargs = f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n" if dataset_path == "json" else ""
    return (f"task: {task}\ndataset_path: {dataset_path}\n{kwargs}test_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_choice.yaml").write_text(_task_yaml(data))
    return root


@pytest.fixture(scope="module")
def task_set(task_dir):
    if not HAS_LM_EVAL:
        pytest.skip("lm-eval is not installed")
    from llmprune_kernels.pipeline.zeroshot import load_tasks

    return load_tasks(TASK, include_path=task_dir)


@torch.no_grad()
def expected_accuracy(model, tok, docs=DOCS) -> float:
    """lm-eval's multiple-choice rule by hand: the choice (after a " " delimiter) of the highest summed
    log-likelihood given the question; the context/continuation split of the whole string's tokens."""
    correct = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx = tok.encode(d["question"])
            cont = tok.encode(d["question"] + " " + choice)[len(ctx):]
            logp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
            scores.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return correct / len(docs)


@needs_lm_eval
def test_zero_shot_scores_the_in_memory_model(task_set):
    from llmprune_kernels.pipeline.zeroshot import zero_shot

    model, tok = tiny_model("llama"), tiny_tokenizer()
    rng = torch.random.get_rng_state()
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    res = zero_shot(model, tok, task_set, device="cpu", batch_size=3)
    assert res["tasks"][TASK]["samples"] == len(DOCS)
    assert res["tasks"][TASK]["acc"] == pytest.approx(expected_accuracy(model, tok), abs=1e-9)
    assert res["mean_acc"] == res["tasks"][TASK]["acc"] and res["num_fewshot"] == 0 and res["lm_eval_version"]
    assert res["tasks"][TASK]["acc_stderr"] >= 0
    # the caller's random state, environment and model mode are left as they were
    assert torch.equal(rng, torch.random.get_rng_state())
    assert {k: os.environ.get(k) for k in env} == env
    assert not model.training


def test_docs_choices_have_equal_length():
    tok = tiny_tokenizer()
    for d in DOCS:
        ctx = len(tok.encode(d["question"]))
        assert {len(tok.encode(d["question"] + " " + c)) - ctx for c in d["choices"]} == {2}, d


@needs_lm_eval
def test_zero_shot_follows_the_weights(task_set):
    """Other weights, another score, each equal to the hand-computed one."""
    from llmprune_kernels.pipeline.zeroshot import zero_shot

    tok = tiny_tokenizer()
    accs = set()
    for seed in range(1, 4):
        model = tiny_model("llama", seed=seed)
        res = zero_shot(model, tok, task_set, batch_size=2)
        assert res["tasks"][TASK]["acc"] == pytest.approx(expected_accuracy(model, tok), abs=1e-9)
        accs.add(res["tasks"][TASK]["acc"])
    assert len(accs) > 1


@needs_lm_eval
def test_limit_and_names(task_dir):
    from llmprune_kernels.pipeline.zeroshot import zero_shot

    res = zero_shot(tiny_model("llama"), tiny_tokenizer(), f" {TASK}, ", include_path=task_dir, limit=2)
    assert res["tasks"][TASK]["samples"] == 2 and res["limit"] == 2


@needs_lm_eval
def test_unknown_task_and_missing_dataset_are_one_line_errors(task_dir, tmp_path):
    from llmprune_kernels.pipeline.zeroshot import load_tasks

    with pytest.raises(LookupError, match=r"unknown lm-eval task 'llmprune_tiny_choise' \(did you mean "
                                          r"'llmprune_tiny_choice'"):
        load_tasks("llmprune_tiny_choise", include_path=task_dir)
    # a hub dataset that is not in the cache: offline, it names the task and the dataset
    (tmp_path / "hub.yaml").write_text(_task_yaml(None, "llmprune_uncached", "llmprune-test/no-such-dataset"))
    with pytest.raises(FileNotFoundError, match=r"zero-shot task 'llmprune_uncached' needs the dataset "
                                                r"llmprune-test/no-such-dataset, which is not in the Hugging Face "
                                                r"cache") as info:
        load_tasks(["llmprune_uncached"], include_path=tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="task directory"):
        load_tasks(TASK, include_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="no zero-shot task"):
        load_tasks(" , ")


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    import sys

    from llmprune_kernels.pipeline.zeroshot import load_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ImportError, match=r"needs the package 'lm-eval'.*pip install 'llmprune_kernels\[eval\]'"):
        load_tasks("boolq")


def test_offline_hub_restores_everything(monkeypatch):
    import huggingface_hub.constants as hub

    from llmprune_kernels.pipeline.zeroshot import offline_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = hub.HF_HUB_OFFLINE
    with offline_hub():
        assert hub.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert hub.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in os.environ
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"


# --- the command ---------------------------------------------------------------------------------------

@pytest.fixture
def model_dir(cli_model_dir):
    return cli_model_dir


def _args(root, task_dir, *extra):
    return [str(root / "model"), "--text", str(root / "text.txt"), "--seqlen", "32", "--device", "cpu", "-q",
            *extra, "--tasks", TASK, "--tasks-path", str(task_dir)]


@needs_lm_eval
def test_cli_prune_reports_dense_and_pruned_accuracy(model_dir, task_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out, rep = tmp_path / "pruned", tmp_path / "report.json"
    rc = main(["prune", *_args(model_dir, task_dir, "--nsamples", "4", "--method", "magnitude", "--sparsity",
                               "0.6", "--output", str(out), "--report", str(rep))])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads(rep.read_text())
    zs = report["zero_shot"]
    dense, pruned = zs["dense"]["tasks"][TASK]["acc"], zs["pruned"]["tasks"][TASK]["acc"]
    tok = tiny_tokenizer()
    assert dense == pytest.approx(expected_accuracy(tiny_model("llama"), tok), abs=1e-9)
    assert pruned == pytest.approx(expected_accuracy(AutoModelForCausalLM.from_pretrained(out).eval(), tok), abs=1e-9)
    assert f"  {TASK} acc: {dense:.4f} -> {pruned:.4f} ({len(DOCS)} docs)" in printed
    assert {"zero_shot_dense", "zero_shot_pruned"} <= set(report["timings_s"])
    assert json.loads((out / "pruning_report.json").read_text())["zero_shot"] == zs


@needs_lm_eval
def test_cli_prune_without_eval_scores_the_pruned_model_only(model_dir, task_dir, tmp_path, capsys):
    rep = tmp_path / "r.json"
    assert main(["prune", *_args(model_dir, task_dir, "--method", "magnitude", "--no-eval", "--tasks-limit", "3",
                                 "--report", str(rep))]) == 0
    zs = json.loads(rep.read_text())["zero_shot"]
    assert zs["dense"] is None and zs["pruned"]["tasks"][TASK]["samples"] == 3 and zs["pruned"]["limit"] == 3
    assert f"  {TASK} acc: " in capsys.readouterr().out


@needs_lm_eval
def test_cli_eval_tasks(model_dir, task_dir, tmp_path, capsys):
    rep = tmp_path / "e.json"
    assert main(["eval", *_args(model_dir, task_dir, "--report", str(rep))]) == 0
    printed = capsys.readouterr().out
    zs = json.loads(rep.read_text())["zero_shot"]
    acc = zs["dense"]["tasks"][TASK]["acc"]
    assert acc == pytest.approx(expected_accuracy(tiny_model("llama"), tiny_tokenizer()), abs=1e-9)
    assert "perplexity:" in printed and f"  {TASK} acc: {acc:.4f} ({len(DOCS)} docs)" in printed


def _fails(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


@needs_lm_eval
def test_cli_task_errors_come_before_the_model_loads(model_dir, task_dir, tmp_path, capsys, monkeypatch):
    import llmprune_kernels.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    (tmp_path / "hub.yaml").write_text(_task_yaml(None, "llmprune_uncached", "llmprune-test/no-such-dataset"))
    for command in ("prune", "eval"):
        rc, err = _fails([command, *_args(model_dir, tmp_path)[:-4], "--tasks", "llmprune_uncached",
                          "--tasks-path", str(tmp_path)], capsys)
        assert rc == 2 and err.count("\n") == 1
        assert "llmprune: error: zero-shot task 'llmprune_uncached' needs the dataset llmprune-test/no-such-" in err
    rc, err = _fails(["prune", *_args(model_dir, task_dir, "--stream", "--output", str(tmp_path / "o"))], capsys)
    assert rc == 2 and "--tasks evaluates the model in memory, which --stream never holds whole" in err
    rc, err = _fails(["prune", *_args(model_dir, task_dir)[:-4], "--tasks-path", str(task_dir)], capsys)
    assert rc == 2 and "--tasks-path adds task YAMLs for --tasks; give --tasks too" in err


def test_summary_lines():
    from llmprune_kernels.pipeline.zeroshot import summarise, summary_lines

    def run(acc_a, acc_b):
        out = {"results": {"a": {"alias": "a", "acc,none": acc_a, "acc_stderr,none": "N/A"},
                           "b": {"acc,none": acc_b, "acc_norm,none": 0.5}},
               "n-samples": {"a": {"original": 10, "effective": 10}, "b": {"original": 4, "effective": 4}}}
        return summarise(out, ["a", "b"], 0, None)

    dense, pruned = run(0.75, 0.25), run(0.5, 0.25)
    assert dense["tasks"]["a"] == {"acc": 0.75, "acc_stderr": None, "samples": 10}
    assert dense["mean_acc"] == 0.5 and pruned["mean_acc"] == 0.375
    lines = summary_lines({"dense": dense, "pruned": pruned})
    assert lines[1:] == ["  a acc: 0.7500 -> 0.5000 (10 docs)", "  b acc: 0.2500 -> 0.2500 (4 docs)",
                         "  mean acc: 0.5000 -> 0.3750"]
    assert summary_lines(None) == [] and summary_lines({"dense": None, "pruned": None}) == []
