"""The 2:4 backend interface in use: a toy backend registered here runs through dispatch, tuning tables
and SparseLinear exactly as the built-in ones do, with no change to any of them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels.sparse24 import SparseLinear, backends, dispatch, sparsify_
from llmprune_kernels.sparse24.backends import Backend
from llmprune_kernels.sparse24.pack import Packed24, unpack_24
from llmprune_kernels.testing import random_24_weight


class ToyBackend(Backend):
    """Matmul on the expanded weight; its config is a scale applied to nothing but the JSON round trip."""

    name = "toy"
    max_m = 8

    def __init__(self):
        self.prepared = 0
        self.bound: list[tuple[int, object]] = []

    def available(self, device):
        return True

    def supports(self, out_features, in_features, dtype):
        return dtype == torch.float32

    def prepare(self, packed: Packed24, config=None):
        self.prepared += 1
        return unpack_24(packed)

    def bind(self, state, config, m, in_features, out_features, bias):
        self.bound.append((m, config))
        return lambda x: x @ state.T + (bias if bias is not None else 0)

    def call(self, state, config, x, out_features, bias):
        return self.bind(state, config, x.numel() // x.shape[-1], x.shape[-1], out_features, bias)(x)

    def config_to_json(self, config):
        return {"tile": config}

    def config_from_json(self, value):
        return value["tile"]


@pytest.fixture
def toy():
    backend = backends.register(ToyBackend())
    yield backend
    backends.unregister("toy")


def _module(out_features=16, in_features=32, bias=True):
    lin = nn.Linear(in_features, out_features, bias=bias)
    lin.weight.data = random_24_weight(out_features, in_features, torch.float32, "cpu")
    return lin, SparseLinear.from_linear(lin)


def test_forced_toy_backend_runs_and_gives_nn_linear(toy):
    assert "toy" in backends.names() and backends.names()[-1] == "toy"
    lin, sl = _module()
    sl.force_path = "toy"
    x = torch.randn(2, 3, 32)
    assert torch.allclose(sl(x), lin(x), atol=1e-6)
    assert toy.bound and toy.bound[-1][0] == 6 and toy.prepared == 1
    sl(torch.randn(5, 32))
    assert toy.prepared == 1  # the layout is built once per module
    # above its M range the forced backend gives way to dense
    n_bound = len(toy.bound)
    y = sl(torch.randn(9, 32))
    assert len(toy.bound) == n_bound and y.shape == (9, 16)


def test_toy_backend_gets_the_frozen_weight_gradient(toy):
    lin, sl = _module()
    sl.force_path = "toy"
    x = torch.randn(4, 32, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    sl(x).sum().backward()
    F.linear(xr, lin.weight.detach(), lin.bias.detach()).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-6)
    assert sl.bias.grad is not None and torch.allclose(sl.bias.grad, torch.full((16,), 4.0))


def test_dispatch_and_tables_iterate_the_registry(toy, tmp_path):
    assert dispatch.choose_path({"dense": 1.0, "toy": 0.5}) == "toy"
    assert dispatch.choose_path({"dense": 1.0, "toy": 0.99}) == "dense"  # within the margin
    # equal times: registry order (toy was registered last)
    assert dispatch.choose_path({"dense": 1.0, "toy": 0.5, "decode": 0.5}) == "decode"
    table = dispatch.TuningTable({dispatch.shape_key(16, 32, torch.float32): {
        4: dispatch.Choice("toy", {"dense": 1.0, "toy": 0.5}, {"toy": 7}),
        64: dispatch.Choice("dense", {"dense": 1.0, "toy": 1.02}, {"toy": 3})}})
    path = str(tmp_path / "table.json")
    table.save(path)
    back = dispatch.TuningTable.load(path)
    assert back.lookup(16, 32, torch.float32, 3).path == "toy" and back.lookup(16, 32, torch.float32, 3).config() == 7
    assert dispatch.lean_choice(back.lookup(16, 32, torch.float32, 64), 0.05).path == "toy"
    assert back.paths_for(16, 32, torch.float32) == {"toy", "dense"}


def test_unknown_backend_names_are_errors(toy):
    _, sl = _module()
    with pytest.raises(ValueError, match=r"unknown 2:4 backend 'nope'; registered: dense, decode, .*toy"):
        sl.force_path = "nope"
    with pytest.raises(ValueError, match="already registered"):
        backends.register(ToyBackend())
    with pytest.raises(ValueError, match="tuning table path 'nope' is unknown"):
        dispatch.Choice.from_json({"path": "nope"})


def test_sparsify_keeps_the_forced_toy_backend_on_cpu(toy):
    lin, _ = _module()
    model = sparsify_(nn.Sequential(lin))
    model[0].force_path = "toy"
    x = torch.randn(3, 32)
    assert torch.allclose(model(x), lin(x), atol=1e-6) and toy.bound[-1][0] == 3
