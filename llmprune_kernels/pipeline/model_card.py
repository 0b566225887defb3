"""The model card (README.md) of a pruned model's directory, from its pruning report.

The card is what the Hugging Face hub shows: YAML front matter (``base_model``, ``library_name``,
``pipeline_tag``, ``tags``; the base model's ``license`` / ``language`` when its own card names them) and a
body with the method, the sparsity or N:M pattern, the calibration data, dense and pruned perplexity, the
zero-shot results and the library version. ``save_model`` and ``prune_pretrained`` write it beside the
weights; the output's README.md is always the pruned model's own card, never the base model's (a streamed
run copies the source's other files, and its README.md is replaced by this card, which names the base model).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmprune_kernels.pipeline.embedded import EMBEDDED_HUB_ID, model_display_name

CARD_FILE = "README.md"
# Front-matter fields carried over from the base model's card: its license binds the pruned weights too.
INHERITED = ("license", "license_name", "license_link", "language")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_DIR = re.compile(r"models--([\w.-]+)--([\w.-]+)")


def hub_id(model: str | None) -> str | None:
    """The hub id of the base model, when the report's model name tells it; else None.

    Known: the embedded SmolLM2, a directory inside the Hugging Face cache (``.../models--ORG--NAME/
    snapshots/...``) and a plain ``ORG/NAME`` that is not a local path. A local directory's name is not a
    hub id: the hub refuses a card whose ``base_model`` names no model, so it is left out then.
    """
    if not model:
        return None

    if model == model_display_name(None):
        return EMBEDDED_HUB_ID
    found = _CACHE_DIR.search(model)
    if found:
        return f"{found.group(1)}/{found.group(2)}"
    if _HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a Markdown card ({} without one or when it does not parse)."""
    import yaml

    found = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, flags=re.S)
    if not found:
        return {}
    try:
        meta = yaml.safe_load(found.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_card_fields(model: str | None) -> dict[str, Any]:
    """``license`` and ``language`` from the README.md of a local base model directory, if it has them."""
    if not model:
        return {}
    card = Path(model).expanduser() / CARD_FILE
    try:
        meta = _front_matter(card.read_text(encoding="utf-8")) if card.is_file() else {}
    except (OSError, UnicodeDecodeError):
        return {}
    return {k: meta[k] for k in INHERITED if k in meta}


def _sparsity_words(sparsity: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    """('50% unstructured' or '2:4 semi-structured', tags)."""
    if not sparsity:
        return "unknown sparsity", []
    if sparsity.get("n") and sparsity.get("m"):
        n, m = sparsity["n"], sparsity["m"]
        return f"{n}:{m} semi-structured", ["semi-structured-sparsity", f"sparsity-{n}of{m}"]
    s = sparsity.get("sparsity")
    if s is None:
        return "unknown sparsity", []
    pct = f"{100 * s:g}"
    return f"{pct}% unstructured", ["unstructured-sparsity", f"sparsity-{pct}"]


def _part(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``report[key]`` when it is a dict, else {} (a hand-made report may hold anything there)."""
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _library_version(report: Mapping[str, Any]) -> str:
    version = _part(report, "versions").get("llmprune_kernels")
    if version:
        return str(version)
    from llmprune_kernels._version import __version__

    return __version__


def front_matter(report: Mapping[str, Any], base_model: str | None = None) -> dict[str, Any]:
    """The card's metadata as a dict (``base_model``: the hub id, overriding what the report tells)."""
    method = report.get("method")
    _, sparsity_tags = _sparsity_words(_part(report, "sparsity"))
    meta: dict[str, Any] = {}
    model = str(report["model"]) if report.get("model") else None
    base = base_model or hub_id(model)
    if base:
        meta["base_model"] = base
    meta.update(base_card_fields(model))
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["llmprune_kernels", "pruned", "sparse"] + ([str(method)] if method else []) + sparsity_tags
    if _part(report, "owl"):
        tags.append("owl")
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def _yaml(meta: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True, default_flow_style=False)


def _calibration(data: Mapping[str, Any], uses_calibration: bool) -> str:
    if not data.get("nsamples") or not uses_calibration:
        return "none (the method uses no calibration data)"
    files = data.get("text_files")
    source = ", ".join(Path(f).name for f in files) if files else data.get("source", "the default text")
    tokens = data["nsamples"] * (data.get("seqlen") or 0)
    seed = f", seed {data['seed']}" if data.get("seed") is not None else ""
    return f"{data['nsamples']} windows × {data.get('seqlen')} tokens ({tokens:,} tokens) of {source}{seed}"


def _held_out(data: Mapping[str, Any]) -> str:
    if data.get("eval_text_files"):
        return ", ".join(Path(f).name for f in data["eval_text_files"])
    if data.get("text_files"):  # the CLI holds out the last 20% of the calibration files
        return f"the held-out part of {', '.join(Path(f).name for f in data['text_files'])}"
    return f"held-out {data.get('source') or 'text'}"


def _zero_shot_table(zero_shot: Mapping[str, Any] | None) -> list[str]:
    zero_shot = zero_shot or {}
    dense, pruned = zero_shot.get("dense"), zero_shot.get("pruned")
    runs = [(label, r) for label, r in (("dense", dense), ("pruned", pruned))
            if isinstance(r, Mapping) and isinstance(r.get("tasks"), Mapping)]
    if not runs:
        return []
    first = runs[0][1]
    fewshot = first.get("num_fewshot") or 0
    limit = first.get("limit")
    lines = ["", f"### {'Zero-shot' if not fewshot else f'{fewshot}-shot'} accuracy", "",
             f"lm-evaluation-harness {first.get('lm_eval_version')}"
             + (f", first {limit} documents of each task" if limit else "") + ".", "",
             "| task | metric | " + " | ".join(label for label, _ in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    names = list(dict.fromkeys(n for _, r in runs for n in r.get("tasks", {})))
    for name in names:
        metrics = next(r["tasks"][name] for _, r in runs if name in r.get("tasks", {}))
        for metric in [k for k in metrics if k != "samples" and not k.endswith("_stderr")]:
            cells = [_num(r.get("tasks", {}).get(name, {}).get(metric), 4) for _, r in runs]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    if len(names) > 1 and any(r.get("mean_acc") is not None for _, r in runs):
        lines.append("| mean | acc | " + " | ".join(_num(r.get("mean_acc"), 4) for _, r in runs) + " |")
    return lines


def model_card(report: Mapping[str, Any], *, base_model: str | None = None,
               report_file: str | None = "pruning_report.json") -> str:
    """The README.md text of a pruned model's directory from its pruning report (``build_report``'s dict).

    ``base_model``: the hub id, when the report's model name does not tell it (see ``hub_id``).
    ``report_file``: the report's name beside the weights, which the card points to (None: not written).
    Fields the report lacks are left out or shown as "–": any report dict gives a card.
    """
    meta = front_matter(report, base_model)
    method = report.get("method") or "unknown method"
    sparsity = _part(report, "sparsity")
    words, _ = _sparsity_words(sparsity)
    source = str(report.get("model") or "an unnamed model")
    base = meta.get("base_model")
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{Path(source).name or source}`"
    data, options = _part(report, "data"), _part(report, "options")
    version = _library_version(report)
    owl = _part(report, "owl")
    spread = (f"OWL layer-wise sparsity ({words} on average over the layers)" if owl and owl.get("layer_sparsity")
              else f"{words} sparsity")

    lines = ["---", _yaml(meta).rstrip("\n"), "---", "",
             f"# {(base or Path(source).name or source).split('/')[-1]} pruned with {method}, {words}", "",
             (f"{base_text} pruned with llmprune_kernels {version}: every Linear of the decoder layers has "
              f"{spread} after {method} (the embeddings and the LM head are dense). The weights are stored "
              f"dense, zeros included: plain `transformers` loads them. The base model's card, license and "
              f"terms apply to this model too."), "",
             "## Pruning", "", "| setting | value |", "|---|---|",
             f"| base model | {base or Path(source).name or source} |",  # a local path: its name alone
             f"| method | {method} |",
             f"| sparsity | {words}"
             + (f" ({sparsity['n']} of every {sparsity['m']} consecutive input weights are zero)"
                if sparsity.get("n") and sparsity.get("m") else "") + " |"]
    if isinstance(report.get("overall_sparsity"), (int, float)):
        count = len(report.get("linears") or [])
        lines.append(f"| measured sparsity | {_num(report['overall_sparsity'], 4)} over {count} Linears |")
    if options:
        lines.append("| options | " + ", ".join(f"{k}={v}" for k, v in options.items()) + " |")
    if owl and owl.get("layer_sparsity"):
        ls = owl["layer_sparsity"]
        lines.append(f"| OWL layer sparsity | {min(ls):.4f} to {max(ls):.4f} (M {owl.get('M')}, "
                     f"lambda {owl.get('lambda')}) |")
    lines.append(f"| calibration data | {_calibration(data, bool(report.get('uses_calibration', True)))} |")

    ppl = _part(report, "perplexity")
    table = _zero_shot_table(_part(report, "zero_shot"))
    if ppl.get("dense") is not None or ppl.get("pruned") is not None or table:
        lines += ["", "## Evaluation"]
    if ppl.get("dense") is not None or ppl.get("pruned") is not None:
        where = f"{data.get('eval_windows')} windows × {data.get('eval_seqlen')} tokens of {_held_out(data)}"
        lines += ["", "### Perplexity", "", f"Held-out perplexity on {where} (lower is better).", "",
                  "| dense | pruned |", "|---|---|", f"| {_num(ppl.get('dense'))} | {_num(ppl.get('pruned'))} |"]
    lines += table

    versions = _part(report, "versions")
    software = [f"llmprune_kernels {version}"] + [f"{k} {versions[k]}" for k in ("torch", "transformers")
                                                  if versions.get(k)]
    lm_eval = next((r.get("lm_eval_version") for r in _part(report, "zero_shot").values()
                    if isinstance(r, dict) and r.get("lm_eval_version")), None)
    if lm_eval:
        software.append(f"lm-eval {lm_eval}")
    lines += ["", "## Software", "", ", ".join(software) + "."
              + (f" Pruned {report['created']}." if report.get("created") else "")
              + (f" The full record is `{report_file}` beside the weights." if report_file else ""), ""]
    return "\n".join(lines)


def write_card(folder: str | Path, report: Mapping[str, Any], *, report_file: str | None = "pruning_report.json",
               base_model: str | None = None) -> Path:
    """Write ``model_card(report)`` as ``folder/README.md``: the output's own card, replacing a copied one."""
    path = Path(folder) / CARD_FILE
    plain = json.loads(json.dumps(report, default=str))  # tensors, dtypes, paths: as the JSON report has them
    path.write_text(model_card(plain, base_model=base_model, report_file=report_file), encoding="utf-8")
    return path


def card_for_stream(folder: str | Path, report: Mapping[str, Any] | None, result: Any, source: str | Path) -> Path:
    """The streamed writer's card: from the report it was given (``build_report``'s), else from the
    ``PruneResult`` alone."""
    if isinstance(report, Mapping) and "report_version" in report:
        return write_card(folder, report)
    from llmprune_kernels.pipeline.report import build_report

    config = result.config
    minimal = build_report(model=str(source), method=result.method, options=result.options,
                           sparsity={"sparsity": config.sparsity, "n": config.n, "m": config.m,
                                     "label": config.label}, prune_result=result)
    return write_card(folder, minimal, report_file=None)
