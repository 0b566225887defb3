"""Zero-shot accuracy of an in-memory model through lm-evaluation-harness (the optional extra ``eval``).

``zero_shot(model, tokenizer, ["boolq", "arc_easy"])`` wraps the model as it is, pruned or not, in lm-eval's
``HFLM`` and runs ``lm_eval.simple_evaluate``: the same prompts, metrics and normalisations the pruning
papers (SparseGPT, Wanda, OWL) report, without saving the model first.

Nothing is downloaded: the Hugging Face hub and datasets run offline for the evaluation, so a task's
dataset must already be in the user's Hugging Face cache; a task whose dataset is missing fails before any
work with one line naming the task and the dataset. Custom tasks are lm-eval task YAMLs in a directory
(``include_path``), e.g. a multiple-choice task over a local JSON-lines file (``dataset_path: json``).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE

INSTALL_HINT = "pip install 'llmprune_kernels[eval]' (or: pip install lm-eval)"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"zero-shot evaluation needs the package 'lm-eval', which is not installed: "
                          f"{INSTALL_HINT}") from exc


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def offline_hub(enabled: bool = True) -> Iterator[None]:
    """The Hugging Face hub and datasets offline for the block, everything restored afterwards.

    Both libraries read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, when first imported, and
    transformers (so huggingface_hub) is imported long before lm-eval: the environment is set for the
    modules not imported yet, and the constants of those already imported are set too.
    """
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    patched: list[tuple[Any, str, Any]] = []
    for module_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    os.environ.update({k: "1" for k in OFFLINE_VARS})
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"boolq,arc_easy"`` or a list of names -> unique names in order."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    if not names:
        raise ValueError(f"no zero-shot task in {tasks!r}; allowed: lm-eval task names separated by commas, "
                         f"e.g. boolq,arc_easy")
    return names


@dataclass(frozen=True)
class TaskSet:
    """Task names checked against an lm-eval ``TaskManager`` (whose index takes seconds to build: reuse it)."""

    names: tuple[str, ...]
    manager: Any  # lm_eval.tasks.TaskManager
    include_path: str | None = None


def _manager(names: Sequence[str], include_path: str | None):
    from lm_eval.tasks import TaskManager

    if include_path:
        # Indexing only the custom directory is fast; lm-eval's own ~15k task YAMLs take seconds.
        own = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in own.all_tasks for n in names):
            return own
    return TaskManager(include_path=include_path)


def _offline_failure(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionError) or "offline" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _dataset_of(manager, name: str) -> str | None:
    entry = getattr(manager, "task_index", {}).get(name)
    cfg = getattr(entry, "cfg", None) or {}
    path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
    return f"{path} ({sub})" if path and sub else path


def load_tasks(tasks: str | Sequence[str] | TaskSet, *, include_path: str | os.PathLike | None = None,
               offline: bool = True) -> TaskSet:
    """Check the task names and load every task's dataset once (from the cache when ``offline``).

    Raises ``ImportError`` without lm-eval, ``LookupError`` for an unknown task, ``FileNotFoundError`` for
    a dataset missing from the Hugging Face cache (naming the task and the dataset) and ``ValueError`` for
    a task that fails to load otherwise, each with a one-line message.
    """
    if isinstance(tasks, TaskSet):
        return tasks
    _require_lm_eval()
    names = parse_tasks(tasks)
    path = None
    if include_path is not None:
        path = str(Path(include_path).expanduser())
        if not Path(path).is_dir():
            raise FileNotFoundError(f"task directory {str(include_path)!r} does not exist or is not a directory; "
                                    f"allowed: a directory of lm-eval task YAML files")
    manager = _manager(names, path)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise LookupError(f"unknown lm-eval task {name!r}{hint}; allowed: a task, group or tag name of "
                              f"lm-eval {lm_eval_version()}" + (f" or of the YAMLs in {path}" if path else ""))
    load = getattr(manager, "load", None) or manager.load_task_or_group
    for name in names:  # one at a time, so that a failure names its task
        try:
            with offline_hub(offline), warnings.catch_warnings(), _quiet_lm_eval(False, logging.ERROR):
                warnings.simplefilter("ignore", DeprecationWarning)
                load([name])
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types; one line each
            detail = " ".join(str(exc).split()) or type(exc).__name__
            if offline and _offline_failure(exc):
                dataset = _dataset_of(manager, name)
                raise FileNotFoundError(
                    f"zero-shot task {name!r} needs the dataset {dataset or 'it names'}, which is not in the Hugging "
                    f"Face cache ({detail}); nothing is downloaded here: fetch it once with network access, e.g. "
                    f"python -c \"from lm_eval.tasks import TaskManager, get_task_dict; "
                    f"get_task_dict(['{name}'], TaskManager())\"") from exc
            raise ValueError(f"zero-shot task {name!r} could not be loaded: {detail}") from exc
    return TaskSet(tuple(names), manager, path)


class _DropExpected(logging.Filter):
    """Warnings lm-eval gives for how it is used here: a model object instead of a name, and the explicit
    ``num_fewshot`` over a task's unset default."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model"))
                    or (msg.startswith("Overwriting default num_fewshot") and record.args
                        and record.args[1] is None))


# lm-eval's records of the environment, which the results here drop (the pruning report has its own):
# the git commit of the current directory (whose "fatal: not a git repository" would reach the terminal)
# and torch's collect_env (a dozen subprocesses, pip list among them: seconds per evaluation).
_SKIPPED = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool, level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval's INFO lines (one per task and stage) off, its environment records skipped (``_SKIPPED``);
    without ``progress`` its bars go nowhere too."""
    from lm_eval import evaluator

    root, drop = logging.getLogger("lm_eval"), _DropExpected()
    saved_level = root.level
    saved = {name: getattr(evaluator, name) for name in _SKIPPED if hasattr(evaluator, name)}
    loggers = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.evaluator")]
    root.setLevel(level)
    for lg in loggers:
        lg.addFilter(drop)
    for name in saved:
        setattr(evaluator, name, _SKIPPED[name])
    try:
        if progress:
            yield
        else:
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                yield
    finally:
        root.setLevel(saved_level)
        for lg in loggers:
            lg.removeFilter(drop)
        for name, func in saved.items():
            setattr(evaluator, name, func)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return None  # lm-eval writes "N/A" for a standard error it could not compute


def summarise(out: dict[str, Any], names: Sequence[str], num_fewshot: int, limit: int | float | None) -> dict:
    """lm-eval's results -> ``{"tasks": {task: {metric: value, ..., "samples": n}}, "mean_acc", ...}``.

    Metric keys lose lm-eval's ``,none`` filter suffix (``acc,none`` -> ``acc``); other filters stay
    (``exact_match,flexible-extract``). ``mean_acc``: the plain mean of ``acc`` over the requested names (a
    group counts once, with its own aggregate), as the pruning papers average their zero-shot tables; None
    when one of them reports no ``acc``.
    """
    samples = out.get("n-samples") or {}
    tasks: dict[str, dict[str, Any]] = {}
    for task, row in (out.get("results") or {}).items():
        metrics: dict[str, Any] = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if sep:
                metrics[metric if filt == "none" else key] = _number(value)
        n = samples.get(task, {}).get("effective") if isinstance(samples.get(task), dict) else None
        metrics["samples"] = n if n is not None else row.get("sample_len")
        tasks[task] = metrics
    accs = [tasks[n]["acc"] for n in names if tasks.get(n, {}).get("acc") is not None]
    return {"tasks": tasks, "mean_acc": sum(accs) / len(accs) if len(accs) == len(names) else None,
            "num_fewshot": num_fewshot, "limit": limit, "lm_eval_version": lm_eval_version()}


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | TaskSet,
    *,
    device: torch.device | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    include_path: str | os.PathLike | None = None,
    offline: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot (``num_fewshot=0``) accuracy of ``model`` on lm-eval ``tasks``; see ``summarise`` for the dict.

    ``tasks``: names (``"boolq,arc_easy"`` or a list) or a ``TaskSet`` from ``load_tasks`` (checked once,
    reused for dense and pruned). ``device``: where to run (default: where the model is); a model elsewhere
    is moved there and back, as ``perplexity`` does. ``limit``: the first N documents of each task (a float
    below 1: that fraction), for quick runs. ``include_path``: a directory of custom task YAMLs.
    ``offline``: the hub and datasets offline, so datasets come from the cache (default; see the module
    docstring). Global random states are left alone (lm-eval's few-shot sampler has its own seed).
    """
    if tokenizer is None:
        raise ValueError("zero_shot needs the model's tokenizer; pass the one load_model returned")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r} is invalid; allowed: an integer >= 1")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot {num_fewshot!r} is invalid; allowed: an integer >= 0")
    task_set = load_tasks(tasks, include_path=include_path, offline=offline)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        with offline_hub(offline), _quiet_lm_eval(progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(task_set.names), task_manager=task_set.manager,
                                          num_fewshot=num_fewshot, limit=limit, log_samples=False,
                                          random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.to(home)
        model.train(was_training)
    return summarise(out or {}, task_set.names, num_fewshot, limit)


# --- the ``llmprune`` command ---------------------------------------------------------------------------

def add_cli_arguments(parser) -> None:
    """``--tasks``, ``--tasks-path``, ``--tasks-limit`` and ``--num-fewshot`` for ``llmprune prune`` / ``eval``."""
    from functools import partial

    from llmprune_kernels.cli_checks import int_at_least, positive_int

    parser.add_argument("--tasks", default=None, metavar="LIST",
                        help="zero-shot accuracy through lm-evaluation-harness on these tasks, e.g. "
                             "boolq,arc_easy,arc_challenge,hellaswag,winogrande,piqa,rte,openbookqa; datasets "
                             f"come from the Hugging Face cache, nothing is downloaded (needs: {INSTALL_HINT})")
    parser.add_argument("--tasks-path", default=None, metavar="DIR",
                        help="directory of custom lm-eval task YAMLs for --tasks")
    parser.add_argument("--tasks-limit", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N documents of each task (default: all)")
    parser.add_argument("--num-fewshot", type=partial(int_at_least, low=0), default=0, metavar="K",
                        help="in-context examples per question (default: 0, zero-shot)")


def check_cli(args) -> None:
    """What ``--tasks`` needs that costs nothing to check, before any work."""
    if getattr(args, "tasks_path", None) and not getattr(args, "tasks", None):
        raise ValueError("--tasks-path adds task YAMLs for --tasks; give --tasks too")
    if not getattr(args, "tasks", None):
        return
    if getattr(args, "stream", False):
        raise ValueError("--tasks evaluates the model in memory, which --stream never holds whole; run "
                         "'llmprune eval OUTPUT --tasks ...' on the output afterwards")
    parse_tasks(args.tasks)
    _require_lm_eval()


def cli_tasks(args) -> TaskSet | None:
    """The checked ``--tasks`` (None without), before the model is loaded: a bad name or a missing dataset
    fails now, not after pruning."""
    check_cli(args)
    return load_tasks(args.tasks, include_path=args.tasks_path) if getattr(args, "tasks", None) else None


def cli_zero_shot(model, tokenizer, tasks: TaskSet, device, args, announce: str | None = None) -> tuple[dict, float]:
    """(results, seconds) of one zero-shot run for the command; ``announce``: print one line with this
    label at once (the dense model's, before the long pruning), as the dense perplexity is."""
    import time

    t0 = time.perf_counter()
    res = zero_shot(model, tokenizer, tasks, device=device, batch_size=args.batch_size, limit=args.tasks_limit,
                    num_fewshot=args.num_fewshot, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    if announce:
        print(f"{announce} zero-shot: " + _accuracies(res), flush=True)
    return res, seconds


def _accuracies(res: dict) -> str:
    parts = []
    for name, metrics in res["tasks"].items():
        acc = metrics.get("acc")
        parts.append(f"{name} {acc:.4f}" if acc is not None else name)
    if res.get("mean_acc") is not None and len(res["tasks"]) > 1:
        parts.append(f"mean {res['mean_acc']:.4f}")
    return ", ".join(parts)


def summary_lines(zero_shot_results: dict | None) -> list[str]:
    """The summary's zero-shot lines: ``{"dense": res or None, "pruned": res or None}`` -> one line per task."""
    if not zero_shot_results:
        return []
    dense, pruned = zero_shot_results.get("dense"), zero_shot_results.get("pruned")
    shown = pruned or dense
    if shown is None:
        return []
    lines = []
    for name, metrics in shown["tasks"].items():
        metric = "acc" if metrics.get("acc") is not None else next(
            (k for k, v in metrics.items() if k != "samples" and not k.endswith("_stderr") and v is not None), None)
        if metric is None:
            continue
        value = f"{metrics[metric]:.4f}"
        if dense is not None and pruned is not None and dense["tasks"].get(name, {}).get(metric) is not None:
            value = f"{dense['tasks'][name][metric]:.4f} -> {value}"
        lines.append(f"  {name} {metric}: {value} ({metrics.get('samples')} docs)")
    means = [r.get("mean_acc") for r in (dense, pruned) if r is not None]
    if len(shown["tasks"]) > 1 and all(m is not None for m in means):
        lines.append("  mean acc: " + " -> ".join(f"{m:.4f}" for m in means))
    fewshot = shown.get("num_fewshot", 0)
    head = f"zero-shot ({'lm-eval ' + str(shown.get('lm_eval_version'))}" + (f", {fewshot}-shot" if fewshot else "")
    return [head + "):"] + lines
