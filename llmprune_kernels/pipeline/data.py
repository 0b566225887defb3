"""Calibration and evaluation text: default corpus, user files, tokenization and windows.

The default text is the documentation every Python ships (``pydoc_data.topics``), so nothing is ever
downloaded. Its topics, in sorted order, are split deterministically and whole: walking them in order,
a topic is held out for evaluation when that keeps the held-out share of characters closest to 20%;
the rest is calibration text. (The corpus itself differs slightly between Python versions,
so perplexities are comparable only within one Python version.)

Calibration = ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (as in the SparseGPT and
Wanda reference code); evaluation = consecutive non-overlapping ``seqlen`` windows of the held-out part.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HOLDOUT = 0.2  # share of the text held out for evaluation
# Windows per forward pass, the one default of the CLI, prune_model, OWL and perplexity: the batch
# composition changes fp32 sums (hence near-tie masks and the last digits of a perplexity).
DEFAULT_BATCH_SIZE = 4


@dataclass(frozen=True)
class TextSplit:
    """Calibration text and held-out evaluation text, with where they came from."""

    calibration: str
    evaluation: str
    source: str


def heldout_topics(sizes: dict[str, int], holdout: float = HOLDOUT) -> list[str]:
    """Topics (sorted) to hold out so that their share of ``sizes`` stays closest to ``holdout``."""
    held, held_size, seen = [], 0, 0
    for key in sorted(sizes):
        n = sizes[key]
        seen += n
        # Hold this topic out if the held-out share ends up nearer the target with it than without it.
        if held_size + n / 2 < holdout * seen:
            held.append(key)
            held_size += n
    return held


def default_text() -> TextSplit:
    """The stdlib's pydoc topics, whole topics split ~80/20 (see ``heldout_topics``)."""
    from pydoc_data.topics import topics

    held = set(heldout_topics({k: len(v) for k, v in topics.items()}))
    calib = [topics[k] for k in sorted(topics) if k not in held]
    evaluation = [topics[k] for k in sorted(topics) if k in held]
    return TextSplit("\n\n".join(calib), "\n\n".join(evaluation), "pydoc_data.topics")


def _read(paths: Sequence[str | os.PathLike]) -> str:
    parts = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {str(p)!r} does not exist or is not a file")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def split_text(text: str, holdout: float = HOLDOUT) -> tuple[str, str]:
    """Split one text into (calibration, held-out) at a line break near ``1 - holdout`` of its length."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout fraction {holdout} is outside the allowed range (0, 1)")
    cut = int(len(text) * (1.0 - holdout))
    nl = text.rfind("\n", 0, cut)
    # Prefer a line boundary, unless it would move the cut by more than a tenth of the text.
    if nl > 0 and cut - nl < len(text) // 10:
        cut = nl + 1
    return text[:cut], text[cut:]


def load_text(
    calibration_files: Sequence[str | os.PathLike] | None = None,
    eval_files: Sequence[str | os.PathLike] | None = None,
    holdout: float = HOLDOUT,
) -> TextSplit:
    """Text for calibration and evaluation.

    * no files: the default pydoc corpus (``default_text``);
    * ``calibration_files`` only: their text, the last ``holdout`` fraction held out for evaluation;
    * ``eval_files`` too: calibration from the first, evaluation from the second, no split.
    * ``eval_files`` only: calibration from the default corpus, evaluation from the files.
    """
    if not calibration_files and not eval_files:
        return default_text()
    if calibration_files and eval_files:
        return TextSplit(_read(calibration_files), _read(eval_files), "files")
    if calibration_files:
        calib, held = split_text(_read(calibration_files), holdout)
        return TextSplit(calib, held, "files (split)")
    return TextSplit(default_text().calibration, _read(eval_files), "pydoc_data.topics + eval files")


def tokenize(tokenizer: Any, text: str, what: str = "text") -> torch.Tensor:
    """Token ids (1-D int64) of ``text`` without special tokens; empty text is an error."""
    if not text or not text.strip():
        raise ValueError(f"{what} is empty; calibration and evaluation need non-empty text")
    # verbose=False: the whole corpus is longer than model_max_length on purpose (it is cut into windows).
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_windows(nsamples: int, seqlen: int) -> None:
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"number of samples {nsamples!r} is invalid; allowed: an integer >= 1")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"sequence length {seqlen!r} is invalid; allowed: an integer >= 2")


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(nsamples, seqlen)`` windows starting at seeded uniform offsets in ``[0, len - seqlen]``.

    Same ids, counts and seed give the same windows on every machine (torch's CPU generator).
    """
    _check_windows(nsamples, seqlen)
    ids = ids.reshape(-1)
    if ids.numel() < seqlen:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            f"give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``(n, seqlen)`` windows of ``ids``; a trailing partial window is dropped."""
    _check_windows(1, seqlen)
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            f"give more text or a smaller sequence length"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows {max_windows} is invalid; allowed: an integer >= 1 or None (all)")
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def model_limits(model: Any) -> tuple[int | None, int | None]:
    """(vocabulary size, longest window) the model takes: its input embedding's rows and the config's
    ``max_position_embeddings`` (``n_positions`` for GPT-2 style configs); None where unknown."""
    vocab = None
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        vocab = int(emb.num_embeddings)
    config = getattr(model, "config", None)
    if vocab is None and isinstance(getattr(config, "vocab_size", None), int):
        vocab = config.vocab_size
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, k, None), int)), None)
    return vocab, positions


def check_windows(ids: Any, model: Any = None, what: str = "calibration windows", min_seqlen: int = 1) -> None:
    """Token windows a model can take: a non-empty 2-D int64 tensor ``(n >= 1, seqlen >= min_seqlen)``, with
    ``model`` given: ids in ``[0, vocabulary size)`` and ``seqlen <= max_position_embeddings``.

    Raises ``ValueError`` naming the bad value and what is allowed (instead of an IndexError from inside
    the model's embedding or position tables).
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a 2-D int64 tensor (n, seqlen) of token ids, got {got}")
    n, seqlen = ids.shape
    if n < 1 or seqlen < min_seqlen:
        raise ValueError(f"{what} have shape {tuple(ids.shape)}; allowed: at least 1 window of at least {min_seqlen} "
                         f"token(s)")
    if model is None:
        return
    vocab, positions = model_limits(model)
    if positions is not None and seqlen > positions:
        raise ValueError(f"{what} are {seqlen} tokens long, longer than the model's max_position_embeddings "
                         f"{positions}; allowed: a sequence length <= {positions}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        allowed = f"[0, {vocab - 1}]" if vocab is not None else ">= 0"
        raise ValueError(f"{what} hold token id {bad}, outside the model's vocabulary; allowed: ids in {allowed} "
                         f"(is the tokenizer the model's own?)")


def get_calibration_and_eval(
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    eval_seqlen: int | None = None,
    eval_max_windows: int | None = None,
    text: TextSplit | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize a ``TextSplit`` (default corpus if None) into calibration and evaluation windows."""
    text = text or default_text()
    calib = calibration_windows(tokenize(tokenizer, text.calibration, "calibration text"), nsamples, seqlen, seed)
    held = eval_windows(tokenize(tokenizer, text.evaluation, "evaluation text"), eval_seqlen or seqlen,
                        eval_max_windows)
    return calib, held
