"""torchao's sparsity entry point, ``sparsify_(model, SemiSparseWeightConfig(), filter_fn)``, on our SparseLinear.

Code written for torchao's removed API moves over by changing the import; these tests pin the semantics it
relied on (the default filter, ``filter_fn(module, fqn)`` asked about every module) and that the swapped
model computes ``F.linear`` with the 2:4-masked weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmprune_kernels
from llmprune_kernels import SemiSparseWeightConfig, SparseLinear, SparsityConfig, sparsify_
from llmprune_kernels.sparse24 import semi_sparse_weight


def keep_24(w: torch.Tensor) -> torch.Tensor:
    """Independent oracle of a 2:4 mask: True where a weight is kept, the 2 largest |w| of every 4 columns."""
    groups = w.detach().float().abs().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(w.shape)


def prune_24_(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Zero 2 of every 4 weights of each Linear (torchao's ``apply_fake_sparsity`` step), except ``skip``."""
    with torch.no_grad():
        for fqn, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and fqn not in skip:
                mod.weight.mul_(keep_24(mod.weight))
    return model


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.up = nn.Linear(dim, hidden, dtype=dtype)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, dim, bias=False, dtype=dtype)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class Toy(nn.Module):
    """Odd shapes (in_features multiples of 4, as 2:4 needs; out_features not), a head left out by some tests."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.blocks = nn.ModuleList(Block(36, 52, dtype) for _ in range(2))
        self.head = nn.Linear(36, 7, dtype=dtype)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


LINEARS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]


def _linears(model: nn.Module) -> dict[str, type]:
    return {fqn: type(m) for fqn, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_config_swaps_every_linear_and_matches_masked_f_linear(dtype):
    torch.manual_seed(0)
    model = Toy(dtype)
    dense = {fqn: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
             for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    prune_24_(model)
    assert sparsify_(model, SemiSparseWeightConfig()) is model
    assert all(t is SparseLinear for t in _linears(model).values()) and list(_linears(model)) == LINEARS
    x = torch.randn(3, 5, 36, dtype=dtype)
    for fqn, (w, b) in dense.items():
        mod = model.get_submodule(fqn)
        xi = torch.randn(2, 7, mod.in_features, dtype=dtype)
        w24 = w * keep_24(w)
        assert torch.equal(mod.weight, w24), fqn  # the packed weight is exactly the masked dense one
        ref32 = F.linear(xi.float(), w24.float(), None if b is None else b.float())
        got = mod(xi)
        assert got.dtype == dtype and got.shape == ref32.shape
        # at most 2x PyTorch's own error in this dtype (flash-attention's rule), plus fp32 rounding
        torch_err = (F.linear(xi, w24, b).float() - ref32).abs().max()
        err = (got.float() - ref32).abs().max()
        assert err <= 2 * torch_err + 1e-5 * ref32.abs().max(), (fqn, float(err), float(torch_err))
    # the whole model: the same forward as the masked dense model
    ref_model = Toy(dtype)
    ref_model.load_state_dict({k: v for fqn, (w, b) in dense.items()
                               for k, v in ((f"{fqn}.weight", w * keep_24(w)), (f"{fqn}.bias", b)) if v is not None})
    with torch.no_grad():
        ref, got = ref_model(x), model(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_filter_fn_is_asked_about_every_module_with_its_fqn():
    model = prune_24_(Toy())
    asked = []

    def filter_fn(module, fqn):
        asked.append((fqn, type(module).__name__))
        return isinstance(module, nn.Linear) and fqn.endswith("up")

    sparsify_(model, SemiSparseWeightConfig(), filter_fn)
    # as torchao's _replace_with_custom_fn_if_matches_filter: every module, the model itself as ""
    assert asked == [(fqn, type(m).__name__) for fqn, m in Toy().named_modules()]
    assert asked[0] == ("", "Toy")
    assert {f for f, t in _linears(model).items() if t is SparseLinear} == {"blocks.0.up", "blocks.1.up"}
    assert type(model.head) is nn.Linear and type(model.blocks[0].down) is nn.Linear


def test_filter_fn_keyword_and_a_dense_head_left_out():
    model = prune_24_(Toy(), skip=("head",))  # an unpruned lm_head, as prune_model leaves it
    sparsify_(model, SemiSparseWeightConfig(),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn != "head")
    assert type(model.head) is nn.Linear
    assert sum(t is SparseLinear for t in _linears(model).values()) == 4


def test_default_filter_refuses_a_dense_linear_naming_it_and_changes_nothing():
    model = prune_24_(Toy(), skip=("head",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^head: weight is not 2:4 sparse: row 0, group \d+.*the default filter "
                                         r"picks every nn.Linear: pass a filter_fn"):
        sparsify_(model, SemiSparseWeightConfig())
    # every weight was packed before any swap: the failure leaves the model as it was
    assert all(t is nn.Linear for t in _linears(model).values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_filter_fn_picking_a_non_linear_is_a_type_error():
    with pytest.raises(TypeError, match=r"filter_fn picked 'blocks.0' \(Block\), not an nn.Linear; sparsify_ swaps "
                                        r"nn.Linear modules only"):
        sparsify_(prune_24_(Toy()), SemiSparseWeightConfig(), lambda module, fqn: fqn.startswith("blocks."))
    with pytest.raises(TypeError, match=r"filter_fn picked 'the model' \(Toy\)"):
        sparsify_(prune_24_(Toy()), SemiSparseWeightConfig(), lambda module, fqn: True)


def test_default_filter_skips_multihead_attention_out_proj():
    """torchao's default filter never swaps MultiheadAttention's out_proj (it reads the weight directly)."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    prune_24_(model)
    sparsify_(model, SemiSparseWeightConfig())
    assert type(model[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model[1], SparseLinear)


def test_older_signature_still_works():
    model = prune_24_(Toy(), skip=("head",))
    sparsify_(model)  # default: the 2:4 Linears only
    assert type(model.head) is nn.Linear and sum(t is SparseLinear for t in _linears(model).values()) == 4
    model = prune_24_(Toy())
    sparsify_(model, lambda module, fqn: fqn == "head")  # a positional filter_fn, asked about Linears only
    assert isinstance(model.head, SparseLinear) and type(model.blocks[0].up) is nn.Linear
    model = prune_24_(Toy())
    sparsify_(model, SemiSparseWeightConfig(), tune=False, dense_tolerance=0.05)  # our keywords with the config
    assert model.head.dense_tolerance == 0.05


@dataclass
class OtherConfig:  # another library's config object
    bits: int = 8


class _TorchaoSemiSparse:  # stands in for torchao.sparsity.SemiSparseWeightConfig
    pass


_TorchaoSemiSparse.__name__ = "SemiSparseWeightConfig"
_TorchaoSemiSparse.__module__ = "torchao.sparsity.sparse_api"


@pytest.mark.parametrize("config, message", [
    (0.5, r"config 0.5 \(float\) is not a SemiSparseWeightConfig, and as a filter_fn .* is not callable; allowed: "
          r"SemiSparseWeightConfig\(\) .*, None, or a filter_fn \(module, fqn\) -> bool\. sparsify_ takes no sparsity"),
    ("2:4", r"config '2:4' \(str\) is not a SemiSparseWeightConfig.*allowed: SemiSparseWeightConfig\(\)"),
    (SparsityConfig(n=2, m=4), r"\(SparsityConfig\) describes pruning, not packing; allowed: SemiSparseWeightConfig"),
    (SemiSparseWeightConfig, r"is the class; pass an instance: SemiSparseWeightConfig\(\)"),
    (OtherConfig(), r"config OtherConfig\(bits=8\) \(OtherConfig\) is not supported; allowed: SemiSparseWeightConfig"),
    (_TorchaoSemiSparse(), r"\(SemiSparseWeightConfig\) is from torchao.sparsity.sparse_api; use this package's: "
                           r"from llmprune_kernels import SemiSparseWeightConfig, sparsify_"),
])
def test_bad_config_is_a_type_error_naming_what_is_allowed(config, message):
    model = prune_24_(Toy())
    with pytest.raises(TypeError, match=message):
        sparsify_(model, config)
    assert all(t is nn.Linear for t in _linears(model).values())


def test_bad_filter_fn_and_positional_keywords():
    with pytest.raises(TypeError, match=r"filter_fn 'head' \(str\) is not callable; allowed: None or a function"):
        sparsify_(prune_24_(Toy()), SemiSparseWeightConfig(), "head")
    with pytest.raises(TypeError, match=r"filter_fn=False: pass tune by keyword"):
        sparsify_(prune_24_(Toy()), None, False)
    with pytest.raises(TypeError, match=r"two filter functions"):
        sparsify_(prune_24_(Toy()), lambda m, f: True, lambda m, f: True)


def test_migration_is_an_import_change():
    assert "SemiSparseWeightConfig" in llmprune_kernels.__all__
    assert semi_sparse_weight is SemiSparseWeightConfig  # torchao's older alias
    assert SemiSparseWeightConfig() == semi_sparse_weight()
    model = prune_24_(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)))
    sparsify_(model, semi_sparse_weight())
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
