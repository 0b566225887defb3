"""The model card (README.md) of a pruned model's directory: hub front matter, method, data, results."""
from __future__ import annotations

import json

import pytest
import yaml
from tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

from llmprune_kernels import SparsityConfig, __version__, prune_pretrained
from llmprune_kernels.cli import main
from llmprune_kernels.pipeline.model_card import EMBEDDED_HUB_ID, hub_id, model_card
from llmprune_kernels.pipeline.models import model_display_name
from llmprune_kernels.pipeline.report import build_report
from llmprune_kernels.pipeline.save import save_model


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card: it must start with a YAML block between two '---' lines."""
    assert text.startswith("---\n"), text[:80]
    head, sep, body = text[4:].partition("\n---\n")
    assert sep, "no closing '---' of the front matter"
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta, body


def _zero_shot(boolq: float, arc: float) -> dict:
    return {"tasks": {"boolq": {"acc": boolq, "acc_stderr": 0.01, "samples": 3270},
                      "arc_easy": {"acc": arc, "acc_stderr": 0.01, "acc_norm": arc - 0.05, "samples": 2376}},
            "mean_acc": (boolq + arc) / 2, "num_fewshot": 0, "limit": None, "lm_eval_version": "0.4.13"}


def _report(**overrides) -> dict:
    kwargs = dict(model=model_display_name(None), method="wanda", options={},
                  sparsity={"sparsity": 0.5, "n": None, "m": None, "label": "0.5"},
                  data={"source": "pydoc topics (split)", "text_files": None, "eval_text_files": None, "nsamples": 16,
                        "seqlen": 512, "seed": 0, "eval_seqlen": 512, "eval_windows": 8},
                  dense_ppl=14.33, pruned_ppl=29.07,
                  zero_shot={"dense": _zero_shot(0.62, 0.70), "pruned": _zero_shot(0.60, 0.64)})
    kwargs.update(overrides)
    return build_report(**kwargs)


def test_card_of_a_full_report():
    meta, body = split_card(model_card(_report()))
    assert meta["base_model"] == EMBEDDED_HUB_ID
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"llmprune_kernels", "pruned", "wanda", "unstructured-sparsity", "sparsity-50"} <= set(meta["tags"])
    assert "wanda" in body and "50% unstructured" in body
    assert "16 windows × 512 tokens (8,192 tokens) of pydoc topics (split), seed 0" in body
    assert "| dense | pruned |\n|---|---|\n| 14.330 | 29.070 |" in body
    assert "8 windows × 512 tokens of held-out pydoc topics (split)" in body
    assert f"# {EMBEDDED_HUB_ID.split('/')[1]} pruned with wanda, 50% unstructured\n" in body
    assert "| boolq | acc | 0.6200 | 0.6000 |" in body and "| arc_easy | acc_norm | 0.6500 | 0.5900 |" in body
    assert "| mean | acc | 0.6600 | 0.6200 |" in body and "lm-evaluation-harness 0.4.13" in body
    assert f"llmprune_kernels {__version__}" in body and "`pruning_report.json`" in body
    assert f"[{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID})" in body


def test_card_of_an_nm_run_without_evaluation():
    report = _report(method="sparsegpt", sparsity={"sparsity": 0.5, "n": 2, "m": 4, "label": "2:4"},
                     options={"blocksize": 128}, dense_ppl=None, pruned_ppl=None, zero_shot=None)
    meta, body = split_card(model_card(report, base_model="org/base"))
    assert meta["base_model"] == "org/base"
    assert {"sparsegpt", "semi-structured-sparsity", "sparsity-2of4"} <= set(meta["tags"])
    assert "2:4 semi-structured (2 of every 4 consecutive input weights are zero)" in body and "blocksize=128" in body
    assert "## Evaluation" not in body


def test_any_report_gives_a_card():
    for report in ({"method": "test"}, {"method": "test", "sparsity": 0.5, "data": [], "model": 3, "zero_shot": 1}):
        meta, body = split_card(model_card(report))
        assert "base_model" not in meta and "test" in meta["tags"]
        assert "unknown sparsity" in body


def test_hub_id(tmp_path):
    assert hub_id(model_display_name(None)) == EMBEDDED_HUB_ID
    assert hub_id("/home/u/.cache/huggingface/hub/models--meta-llama--Llama-2-7b-hf/snapshots/abc123") == \
        "meta-llama/Llama-2-7b-hf"
    assert hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id(str(tmp_path / "org" / "name")) is None  # a local directory is not a hub id
    assert hub_id("./models/x") is None and hub_id(None) is None


def test_license_of_the_base_card_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\nbase_model: other/x\n---\n# X\n")
    meta, _ = split_card(model_card(_report(model=str(tmp_path))))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert "base_model" not in meta  # the source's own base model is not this model's base


def test_save_model_writes_the_card_only_with_a_report(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    plain = save_model(model, tok, tmp_path / "plain")
    assert not (plain / "README.md").exists()
    out = save_model(model, tok, tmp_path / "pruned", extra_json={"pruning_report.json": _report()})
    meta, _ = split_card((out / "README.md").read_text())
    assert meta["base_model"] == EMBEDDED_HUB_ID


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    tiny_model("llama").save_pretrained(root / "model", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "model" / "README.md").write_text("---\nlicense: mit\n---\n# the source model's own card\n")
    (root / "text.txt").write_text(SAMPLE_TEXT * 30)
    return root


def _args(root, *extra):
    return ["prune", str(root / "model"), "--text", str(root / "text.txt"), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "-q", *extra]


def test_cli_prune_output_has_the_card(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_args(model_dir, "--method", "wanda", "--pattern", "2:4", "--output", str(out))) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    meta, body = split_card((out / "README.md").read_text())
    assert "base_model" not in meta and meta["license"] == "mit"
    assert {"wanda", "sparsity-2of4"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    ppl = report["perplexity"]
    assert f"| {ppl['dense']:.3f} | {ppl['pruned']:.3f} |" in body
    assert "4 windows × 32 tokens (128 tokens) of text.txt, seed 0" in body
    assert "8 windows × 32 tokens of the held-out part of text.txt" in body
    assert "`model`" in body and "the source model's own card" not in body


def test_streamed_output_card_replaces_the_copied_source_card(model_dir, tmp_path, capsys):
    out = tmp_path / "streamed"
    source_card = (model_dir / "model" / "README.md").read_text()
    assert main(_args(model_dir, "--stream", "--method", "magnitude", "--sparsity", "0.6", "--output", str(out))) == 0
    text = (out / "README.md").read_text()
    meta, body = split_card(text)
    assert meta["license"] == "mit" and {"magnitude", "sparsity-60"} <= set(meta["tags"])
    assert "the source model's own card" not in text and "60% unstructured" in body
    assert "calibration data | none" in body  # magnitude needs no calibration windows
    assert (model_dir / "model" / "README.md").read_text() == source_card  # the source is untouched


def test_prune_pretrained_without_a_report_still_writes_a_card(model_dir, tmp_path):
    out = tmp_path / "api"
    prune_pretrained(model_dir / "model", out, None, "magnitude", SparsityConfig(0.5), progress=False)
    meta, body = split_card((out / "README.md").read_text())
    assert "magnitude" in meta["tags"] and "50% unstructured" in body
    assert "pruning_report.json" not in body and not (out / "pruning_report.json").exists()
