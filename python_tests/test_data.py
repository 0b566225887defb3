"""Calibration / evaluation text and windows: determinism, disjointness, shapes and clear errors."""
from __future__ import annotations

import pytest
import torch

from llmprune_kernels.pipeline import data


def test_default_text_is_deterministic_and_split_by_topic():
    from pydoc_data.topics import topics

    a, b = data.default_text(), data.default_text()
    assert a == b
    assert a.calibration and a.evaluation
    names = data.heldout_topics({k: len(v) for k, v in topics.items()})
    held = [topics[k] for k in sorted(names)]
    assert a.evaluation == "\n\n".join(held)
    # Calibration is exactly the other topics: every topic is in one part, none in both.
    assert a.calibration == "\n\n".join(topics[k] for k in sorted(topics) if k not in names)
    assert 0 < len(names) < len(topics)
    total = sum(len(t) for t in topics.values())
    assert abs(len(a.evaluation) / total - data.HOLDOUT) < 0.02


def test_heldout_topics_balances_share():
    sizes = {f"t{i:02d}": (i * 37) % 101 + 1 for i in range(60)}
    held = data.heldout_topics(sizes, 0.25)
    share = sum(sizes[k] for k in held) / sum(sizes.values())
    assert abs(share - 0.25) <= max(sizes.values()) / sum(sizes.values())
    assert held == data.heldout_topics(dict(reversed(list(sizes.items()))), 0.25)  # order-independent


def test_split_text_at_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    calib, held = data.split_text(text, 0.2)
    assert calib + held == text
    assert calib.endswith("\n") and held.startswith("line ")
    assert abs(len(held) / len(text) - 0.2) < 0.05
    with pytest.raises(ValueError, match=r"holdout fraction 1.5 .*\(0, 1\)"):
        data.split_text(text, 1.5)


def test_load_text_from_files(tmp_path):
    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    f1.write_text("alpha\n" * 50)
    f2.write_text("omega\n" * 10)
    split = data.load_text([f1])
    assert split.calibration + split.evaluation == "alpha\n" * 50
    both = data.load_text([f1], [f2])
    assert both.calibration == "alpha\n" * 50 and both.evaluation == "omega\n" * 10
    only_eval = data.load_text(None, [f2])
    assert only_eval.calibration == data.default_text().calibration and only_eval.evaluation == "omega\n" * 10
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load_text([tmp_path / "missing.txt"])


class _WordTokenizer:
    """Whitespace 'tokenizer': token id = word number (enough to test windowing)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [int(w) for w in text.split()]}


def test_tokenize_rejects_empty_text():
    with pytest.raises(ValueError, match="calibration text is empty"):
        data.tokenize(_WordTokenizer(), "  \n ", "calibration text")
    ids = data.tokenize(_WordTokenizer(), "3 1 4 1 5")
    assert ids.dtype == torch.long and ids.tolist() == [3, 1, 4, 1, 5]


def test_calibration_windows_seeded_and_inside_text():
    ids = torch.arange(1000)
    w1 = data.calibration_windows(ids, 16, 32, seed=7)
    w2 = data.calibration_windows(ids, 16, 32, seed=7)
    w3 = data.calibration_windows(ids, 16, 32, seed=8)
    assert w1.shape == (16, 32) and w1.dtype == torch.long
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    # Each window is a contiguous slice of the token stream.
    assert torch.equal(w1[:, 1:] - w1[:, :-1], torch.ones(16, 31, dtype=torch.long))
    assert int(w1.max()) < 1000 and int(w1.min()) >= 0
    # A text of exactly one window gives that window every time.
    exact = data.calibration_windows(torch.arange(32), 3, 32)
    assert torch.equal(exact, torch.arange(32).expand(3, 32))


def test_calibration_windows_errors():
    with pytest.raises(ValueError, match=r"calibration text has 10 tokens, fewer than one window of seqlen=32"):
        data.calibration_windows(torch.arange(10), 4, 32)
    with pytest.raises(ValueError, match=r"number of samples 0 is invalid"):
        data.calibration_windows(torch.arange(100), 0, 32)
    with pytest.raises(ValueError, match=r"sequence length 1 is invalid"):
        data.calibration_windows(torch.arange(100), 4, 1)


def test_eval_windows_non_overlapping():
    ids = torch.arange(105)
    w = data.eval_windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.flatten(), torch.arange(100))  # consecutive, disjoint, partial tail dropped
    assert data.eval_windows(ids, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match=r"evaluation text has 5 tokens, fewer than one window of seqlen=10"):
        data.eval_windows(torch.arange(5), 10)
    with pytest.raises(ValueError, match=r"max_windows 0 is invalid"):
        data.eval_windows(ids, 10, max_windows=0)


def test_get_calibration_and_eval_with_real_tokenizer():
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    calib, held = data.get_calibration_and_eval(tok, nsamples=4, seqlen=64, seed=0, eval_max_windows=5)
    assert calib.shape == (4, 64) and held.shape == (5, 64)
    again, _ = data.get_calibration_and_eval(tok, nsamples=4, seqlen=64, seed=0, eval_max_windows=5)
    assert torch.equal(calib, again)
    # Held-out windows come from the held-out topics: they never occur in the calibration token stream.
    calib_stream = data.tokenize(tok, data.default_text().calibration)
    first = held[0]
    starts = (calib_stream[: -64 + 1] == first[0]).nonzero().flatten().tolist()
    assert not any(torch.equal(calib_stream[s : s + 64], first) for s in starts)
