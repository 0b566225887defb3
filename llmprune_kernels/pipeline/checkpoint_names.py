"""A model's tensor names against its checkpoint's, converted layer by layer as transformers 5 converts them.

transformers 5 loads some checkpoints through a conversion mapping (``transformers.conversion_mapping``):
Mixtral's per-expert ``block_sparse_moe.experts.<e>.w1/w2/w3.weight`` and Qwen2/3-MoE's per-expert
``mlp.experts.<e>.gate_proj/up_proj/down_proj.weight`` become two fused 3-D parameters per layer
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), and ``save_pretrained`` writes them back in the
checkpoint's layout. A streamed run holds one layer at a time, so it applies the same conversions one layer at
a time: ``CheckpointNames`` says which checkpoint tensors make each model tensor, ``to_model`` converts them as
``from_pretrained`` does and ``to_checkpoint`` converts a pruned layer back as ``save_pretrained`` does after
``from_pretrained`` (reverting the conversions this checkpoint used). Both only stack, concatenate and split,
so the values are copied bit for bit and the streamed output holds the names and bits ``save_model`` writes.

A checkpoint already in the model's names, or transformers without conversion mappings (4.x), converts nothing.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def _conversions(model: nn.Module) -> list[Any]:
    """The transforms ``from_pretrained`` would apply to ``model``'s checkpoint (none before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    return list(get_model_conversion_mapping(model))


class CheckpointNames:
    """How the checkpoint tensors ``checkpoint_keys`` become ``model``'s tensors, and back.

    Keys the model has no place for are left out, as ``from_pretrained`` leaves them (unexpected keys).
    ``model`` may be on the meta device: it is only asked for names, shapes and its config.
    """

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str]) -> None:
        self.model = model
        meta = model.state_dict()
        transforms = _conversions(model)
        self._converters: dict[str, Any] = {}
        self._source: dict[str, tuple[str, str | None]] = {}  # checkpoint key -> (model key, converter pattern)
        self._order: Any = str
        if not transforms:
            self._source = {k: (k, None) for k in checkpoint_keys if k in meta}
            self.used: list[Any] = []
            return
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self._order = dot_natural_key  # from_pretrained's order: expert 2 before expert 10
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._converters = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(model, "base_model_prefix", None)
        for key in checkpoint_keys:  # as convert_and_load_state_dict_in_model renames them
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if renamed not in meta and key in meta:
                renamed, pattern = rename_source_key(key, [], [], prefix, meta)
            if renamed in meta:
                self._source[key] = (renamed, pattern)
        # The transforms that matched, as from_pretrained records them: what save_pretrained reverts.
        self.used = [t for t in transforms if t.was_used()]
        model._weight_conversions = self.used

    @property
    def converts(self) -> bool:
        """Whether ``to_checkpoint`` changes anything (``save_pretrained`` writes other names than the model's)."""
        return bool(self.used)

    def targets(self, key: str) -> list[str]:
        """The model tensors checkpoint tensor ``key`` goes into (empty: none)."""
        if key not in self._source:
            return []
        renamed, pattern = self._source[key]
        if pattern is None:
            return [renamed]
        patterns = self._converters[pattern].target_patterns
        return [renamed.replace(patterns[0], p) for p in patterns]

    def keys_under(self, prefix: str, inside: bool = True) -> list[str]:
        """The checkpoint keys whose model tensors lie under ``prefix`` (``inside=False``: all the others)."""
        return [k for k in self._source if any(t.startswith(prefix) for t in self.targets(k)) == inside]

    def to_model(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (all of every group a converter merges) as the model's tensors, by model name."""
        out: dict[str, torch.Tensor] = {}
        groups: dict[str, Any] = {}
        for key in sorted(tensors, key=self._order):
            renamed, pattern = self._source[key]
            if pattern is None:
                out[renamed] = tensors[key]
                continue
            if renamed not in groups:  # each model tensor gets its own converter, as in from_pretrained
                groups[renamed] = copy.deepcopy(self._converters[pattern])
            groups[renamed].add_tensor(renamed, key, pattern, tensors[key])
        for first, converter in groups.items():
            for name, t in converter.convert(first, model=self.model, config=self.model.config).items():
                out[name] = t[0] if isinstance(t, list) else t
        return out

    def to_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors (whole layers) under the checkpoint's names, as ``save_pretrained`` writes them."""
        if not self.used:
            return dict(tensors)
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, dict(tensors))

