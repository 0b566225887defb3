"""Calibration statistics as raw sums (methods.statistics) and their sharing across Linears (pipeline.statistics).

Fast paths against references: ``gram_add_`` (fp32 or tensor cores) against ``gram_add_reference``,
``HessianSum`` / ``ActNormSum`` against the running means of ``HessianStats`` / ``ActNormStats``; shared
statistics against one accumulator per Linear, and the same masks as the reference statistics on the tiny models.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_model
from torch import nn

from llmprune_kernels import SparsityConfig
from llmprune_kernels.methods import get_method
from llmprune_kernels.methods.base import _REGISTRY, register_method
from llmprune_kernels.methods.statistics import (
    HESSIAN_TOLERANCE, ActNormSum, HessianSum, StatisticSpec, make_statistic, reference_statistic,
)
from llmprune_kernels.ops import sparsegpt as ops
from llmprune_kernels.ops.act_norm import sq_norm_sum_, sq_norm_sum_reference
from llmprune_kernels.ops.score_mask import triton_usable
from llmprune_kernels.pipeline import prune_model
from llmprune_kernels.pipeline.layerwise import LayerStep, capture_layer_inputs, walk_layers
from llmprune_kernels.pipeline.models import linear_modules
from llmprune_kernels.pipeline.statistics import LayerStatistics, feed_statistics
from llmprune_kernels.reference.sparsegpt import HessianStats
from llmprune_kernels.reference.wanda import ActNormStats

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACT_NORM_RTOL = 2e-6


def assert_hessian_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Every entry within HESSIAN_TOLERANCE of the largest diagonal entry (the tolerance the docstrings state)."""
    atol = HESSIAN_TOLERANCE * float(ref.diagonal().abs().max())
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)


def _batches(width: int, dtype, device="cpu") -> list[torch.Tensor]:
    """Correlated activations, 3-D and 2-D, uneven sizes, scaled like real hidden states."""
    mix = torch.randn(width, width) / width**0.5 + torch.eye(width)
    shapes = [(2, 37, width), (45, width), (1, 70, width), (3, 16, width)]
    return [((torch.randn(s) @ mix) * 3 + 0.5).to(device, dtype) for s in shapes]


# ------------------------------------------------------------------------------ gram_add_ and the Hessian


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.25, 0.75), (2 / 3, 0.0)])
def test_gram_add_equals_reference(dtype, alpha, beta):
    x = _batches(48, dtype)[0].reshape(-1, 48)
    start = torch.randn(48, 48)
    start = start @ start.t()
    got = ops.gram_add_(start.clone(), x, alpha=alpha, beta=beta)
    ref = ops.gram_add_reference(start.clone(), x, alpha=alpha, beta=beta)
    assert got.dtype == torch.float32
    assert_hessian_close(got, ref)


def test_split_gram_equals_the_full_product(dtype=torch.float32):
    """``split``: three block GEMMs of the upper half, then the mirror, give the symmetric full product; the
    skipped block is left untouched until then."""
    x = _batches(96, dtype)[1]
    for split in (1, 40, 95):
        S = torch.full((96, 96), 7.0)
        ops.gram_add_(S, x, alpha=0.5, beta=2.0, split=split)
        assert bool((S[split:, :split] == 7.0).all())
        ops.mirror_split_(S, split)
        ref = ops.gram_add_reference(torch.full((96, 96), 7.0), x, 0.5, 2.0)
        assert_hessian_close(S, ref)
        assert torch.equal(S, S.T)
    for bad in (0, 96, -3):
        with pytest.raises(ValueError, match=rf"gram_add_ split={bad} is invalid; allowed: 0 < split < 96"):
            ops.gram_add_(torch.zeros(96, 96), x, split=bad)
    assert ops.gram_split(4096, "cuda") == 2048 and ops.gram_split(11008, "cuda") == 5504
    assert ops.gram_split(4096, "cpu") is None and ops.gram_split(1024, "cuda") is None
    assert ops.gram_split(4096, "cuda", tensor_cores=False) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wide_hessian_sum_uses_the_split_on_cuda(dtype):
    """HessianSum at 4096 columns on CUDA takes the split (3/4 of the GEMM work): within tolerance of the fp32
    reference and exactly symmetric."""
    cols = 4096
    batches = [torch.randn(2, 300, cols, device="cuda").to(dtype) * 2 for _ in range(3)]
    acc = make_statistic(StatisticSpec("hessian", cols, "cuda"))
    assert acc.split == 2048
    for x in batches:
        acc.add_batch(x)
    H = acc.finalize()
    assert torch.equal(H, H.T)
    assert_hessian_close(H, reference_statistic(StatisticSpec("hessian", cols, "cuda"), batches))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_products_are_exact_in_fp32(dtype):
    # The tensor-core path multiplies fp16/bf16 values with fp32 accumulation; each product is exact in fp32
    # (11- or 8-bit significands), so a single token's x^T x equals the fp64 result bit for bit. The CPU path
    # (fp32 cast, then an fp32 GEMM) is the same arithmetic.
    x = torch.randn(1, 64).to(dtype)
    S = ops.gram_add_(torch.zeros(64, 64), x)
    assert torch.equal(S.double(), x.double().t() @ x.double())


@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_sum_equals_reference_running_mean(dtype):
    batches = _batches(40, dtype)
    spec = StatisticSpec("hessian", 40, "cpu")
    acc = make_statistic(spec, "layers.0.self_attn.q_proj")
    for x in batches:
        acc.add_batch(x)
    ref = reference_statistic(spec, batches)
    assert isinstance(acc, HessianSum) and acc.nsamples == 2 + 1 + 1 + 3
    assert_hessian_close(acc.finalize(), ref)
    # The fp32 reference of the ops module (running mean, extension or reference) agrees too.
    H, n = torch.zeros(40, 40), 0
    for x in batches:
        n = ops.hessian_add_batch(H, n, x)
    assert n == acc.nsamples
    assert_hessian_close(acc.finalize(), H)


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_norm_sum_equals_reference_running_mean(dtype, triton):
    if triton and not triton_usable("cpu"):
        pytest.skip("Triton is not usable on the CPU here")
    batches = _batches(40, dtype)
    spec = StatisticSpec("act_norm", 40, "cpu", triton=triton)
    acc = make_statistic(spec, "layers.0.mlp.up_proj")
    for x in batches:
        acc.add_batch(x)
    assert isinstance(acc, ActNormSum) and acc.nsamples == 7
    torch.testing.assert_close(acc.finalize(), reference_statistic(spec, batches), rtol=ACT_NORM_RTOL, atol=0)


def test_sq_norm_sum_triton_equals_reference():
    if not triton_usable("cpu"):
        pytest.skip("Triton is not usable on the CPU here")
    x = torch.randn(40, 2, 25).permute(1, 2, 0).half()  # last dim strided
    got = torch.rand(40)
    ref = got.clone()
    assert sq_norm_sum_(got, x) == sq_norm_sum_reference(ref, x) == 2
    torch.testing.assert_close(got, ref, rtol=ACT_NORM_RTOL, atol=0)


@pytest.mark.parametrize("kind", ["hessian", "act_norm"])
def test_raw_sums_add_up_across_processes(kind):
    """Two shards accumulated apart, their tensors() summed (what all_reduce(SUM) does), equal one pass."""
    batches = _batches(24, torch.float32)
    spec = StatisticSpec(kind, 24, "cpu")
    whole, part_a, part_b = (make_statistic(spec) for _ in range(3))
    for i, x in enumerate(batches):
        whole.add_batch(x)
        (part_a if i % 2 else part_b).add_batch(x)
    for key, t in part_a.tensors().items():
        t.add_(part_b.tensors()[key])
    assert part_a.nsamples == whole.nsamples == 7
    if kind == "hessian":
        assert_hessian_close(part_a.finalize(), whole.finalize())
    else:
        torch.testing.assert_close(part_a.finalize(), whole.finalize(), rtol=ACT_NORM_RTOL, atol=0)


@pytest.mark.parametrize("kind", ["hessian", "act_norm"])
def test_finalize_once_and_errors_name_the_layer(kind):
    acc = make_statistic(StatisticSpec(kind, 8, "cpu"), "layers.2.self_attn.k_proj")
    with pytest.raises(ValueError, match="layers.2.self_attn.k_proj: no calibration data"):
        acc.finalize()
    bad = torch.randn(3, 8)
    bad[1, 4] = float("inf")
    with pytest.raises(ValueError, match="layers.2.self_attn.k_proj contains 0 NaN and 1 Inf"):
        acc.add_batch(bad)
    with pytest.raises(ValueError, match="width 7, expected in_features=8"):
        acc.add_batch(torch.randn(2, 7))
    acc = make_statistic(StatisticSpec(kind, 8, "cpu"), "q")
    acc.add_batch(torch.randn(2, 5, 8))
    value = acc.finalize()
    assert acc.finalize() is value and acc.finalized
    with pytest.raises(RuntimeError, match="q: add_batch\\(\\) after finalize"):
        acc.add_batch(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="q: tensors\\(\\) after finalize"):
        acc.tensors()


@pytest.mark.parametrize("kind", ["hessian", "act_norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_deferred_finiteness_check(kind, bad):
    """``check=False`` batches (the pipeline's feed: no device sync per batch) are checked once by check_finite,
    however many finite batches follow the bad one; the same sums as checked adds."""
    acc = make_statistic(StatisticSpec(kind, 8, "cpu"), "layers.2.self_attn.k_proj")
    checked = make_statistic(StatisticSpec(kind, 8, "cpu"), "checked")
    for _ in range(2):
        x = torch.randn(3, 8)
        acc.add_batch(x, check=False)
        checked.add_batch(x)
    acc.check_finite()
    assert torch.equal(acc.sum, checked.sum)
    x = torch.randn(3, 8)
    x[2, 5] = bad
    acc.add_batch(x, check=False)
    for _ in range(3):
        acc.add_batch(torch.randn(3, 8) * 1e3, check=False)
    with pytest.raises(ValueError, match=r"^layers.2.self_attn.k_proj: the calibration activations contain NaN or "
                                         r"Inf values"):
        acc.check_finite()


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown statistic 'gram'; allowed: hessian, act_norm"):
        StatisticSpec("gram", 8, "cpu")
    with pytest.raises(ValueError, match="statistic width 0 is invalid"):
        StatisticSpec("hessian", 0, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [256, 1000])
def test_tensor_core_hessian_equals_fp32_on_cuda(dtype, cols):
    batches = [x.to("cuda", dtype) for x in _batches(cols, torch.float32)]
    fast = make_statistic(StatisticSpec("hessian", cols, "cuda", tensor_cores=True))
    fp32 = make_statistic(StatisticSpec("hessian", cols, "cuda", tensor_cores=False))
    H, n = torch.zeros(cols, cols, device="cuda"), 0
    for x in batches:
        fast.add_batch(x)
        fp32.add_batch(x)
        n = ops.hessian_add_batch(H, n, x)  # running mean, tensor cores
    ref = reference_statistic(StatisticSpec("hessian", cols, "cuda"), batches)
    assert_hessian_close(fast.finalize(), ref)
    assert_hessian_close(fp32.finalize(), ref)
    assert_hessian_close(H, ref)
    S = ops.gram_add_(torch.zeros(cols, cols, device="cuda"), batches[0].reshape(-1, cols), alpha=0.5, beta=0.0)
    assert_hessian_close(S, ops.gram_add_reference(torch.zeros_like(S), batches[0].reshape(-1, cols), 0.5, 0.0))


# ------------------------------------------------------------------------------ sharing in the pipeline


LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_linears_reading_one_input_share_one_accumulator(method, kind):
    model = tiny_model(kind)
    captured = capture_layer_inputs(model, random_ids(3, 16), "cpu", 2, False)
    cls = get_method(method)
    for step in walk_layers(model, captured):
        linears = linear_modules(step.layer)
        by_name = {rel: cls(lin, SparsityConfig(0.5), layer_name=f"{step.name}.{rel}") for rel, lin in linears.items()}
        groups = feed_statistics(step, {lin: by_name[rel] for rel, lin in linears.items()})
        assert groups == [[f"{step.name}.{rel}" for rel in g] for g in LLAMA_GROUPS]  # 4 accumulators
        q, k, v = (by_name[f"self_attn.{n}_proj"].stats for n in "qkv")
        assert q is k is v and q is not by_name["self_attn.o_proj"].stats
        assert by_name["mlp.gate_proj"].stats is by_name["mlp.up_proj"].stats
        assert q.nsamples == 3


def _reference_stats(method: str, name: str):
    """``method`` fed through add_batch into the reference running means (HessianStats / ActNormStats)."""
    base = get_method(method)

    def add_batch(self, inp):
        if self.stats is None:
            n = self.layer.in_features
            self.ref = HessianStats(n) if self.statistic == "hessian" else ActNormStats(n)
            self.stats = self  # nsamples / finalize below
        self.ref.add_batch(inp)

    props = {"statistic_spec": lambda self: None, "add_batch": add_batch,
             "nsamples": property(lambda self: self.ref.nsamples),
             "finalize": lambda self: self.ref.H if self.statistic == "hessian" else self.ref.scaler_row}
    return register_method(name)(type(name, (base,), props))


@pytest.fixture
def registered():
    names = []

    def make(factory, method):
        name = f"_{factory.__name__}_{method}"
        names.append(name)
        return factory(method, name).name

    yield make
    for n in names:
        _REGISTRY.pop(n, None)


def _pruned(kind: str, method: str, config: SparsityConfig, batch_size: int = 2) -> dict[str, torch.Tensor]:
    model = tiny_model(kind)
    prune_model(model, random_ids(5, 16, seed=3), method, config, batch_size=batch_size, progress=False,
                measure_error=False)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)], ids=["50%", "2:4"])
def test_shared_statistics_equal_one_accumulator_per_linear(monkeypatch, method, config):
    shared = _pruned("llama", method, config)
    import llmprune_kernels.pipeline.prune as pipeline_prune

    groups = []

    def unshared(step, pruners):
        groups.extend(feed_statistics(step, pruners, share=False))
        return groups

    monkeypatch.setattr(pipeline_prune, "feed_statistics", unshared)
    alone = _pruned("llama", method, config)
    assert len(groups) == 2 * 7 and all(len(g) == 1 for g in groups)  # an accumulator per Linear
    assert shared.keys() == alone.keys()
    for name in shared:
        assert torch.equal(shared[name], alone[name]), name  # same masks, same weights, bit for bit


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)], ids=["50%", "2:4"])
def test_raw_sum_statistics_give_the_reference_statistics_masks(registered, kind, method, config):
    fast = _pruned(kind, method, config, batch_size=3)
    ref = _pruned(kind, registered(_reference_stats, method), config, batch_size=3)
    for name in fast:
        assert torch.equal(fast[name] == 0, ref[name] == 0), name
        torch.testing.assert_close(fast[name], ref[name], rtol=0, atol=1e-4 * float(ref[name].abs().max()))


class _Toy(nn.Module):
    """a and b read x; in mode 'split' b gets an equal copy instead; c runs twice on different tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 6)

    def forward(self, x, mode="same"):
        y = self.a(x) + self.b(x.clone() if mode == "split" else x)
        return self.c(self.c(y).relu())


def _toy_step(toy, modes):
    xs = [torch.randn(2, 5, 8) for _ in modes]
    return LayerStep(0, "toy", toy, xs, [((), {"mode": m}) for m in modes], torch.device("cpu"), False), xs


def _wanda_pruners(toy):
    return {m: get_method("wanda")(m, SparsityConfig(0.5), layer_name=n) for n, m in toy.named_children()}


def test_sharing_follows_tensor_identity_and_repeated_calls_add_each_input():
    toy = _Toy()
    step, xs = _toy_step(toy, ["split", "split"])
    pruners = _wanda_pruners(toy)
    assert feed_statistics(step, pruners) == [["a"], ["b"], ["c"]]  # an equal copy is not the same input
    toy2 = _Toy()
    toy2.load_state_dict(toy.state_dict())
    step2, _ = _toy_step(toy2, ["same", "same"])
    step2.inputs = xs
    pruners2 = _wanda_pruners(toy2)
    assert feed_statistics(step2, pruners2) == [["a", "b"], ["c"]]
    for m in ("a", "b", "c"):
        torch.testing.assert_close(pruners2[getattr(toy2, m)].stats.finalize(), pruners[getattr(toy, m)].stats.finalize(),
                                   rtol=0, atol=0)
    assert pruners2[toy2.c].stats.nsamples == 2 * 2 * 2  # c runs twice per call: both inputs counted


def test_sharing_that_changes_between_batches_raises():
    toy = _Toy()
    step, _ = _toy_step(toy, ["same", "split"])
    with pytest.raises(ValueError, match="Linears a, b shared their input tensor in an earlier calibration batch"):
        feed_statistics(step, _wanda_pruners(toy))
    step, _ = _toy_step(toy, ["same", "split"])
    stats = LayerStatistics(_wanda_pruners(toy), share=False)
    step.forward(stats.hooks(toy), pre_hooks=stats.pre_hooks())
    assert len(stats.groups) == 3


@pytest.mark.parametrize("base", ["magnitude", "wanda", "sparsegpt"])
def test_pruners_without_a_statistic_keep_add_batch(base):
    """Methods without a statistic, and subclasses of built-in ones overriding add_batch, get every batch."""
    seen = []

    class Recorder(get_method(base)):
        def add_batch(self, inp):
            seen.append((self.layer_name, inp.shape))

    toy = _Toy()
    step, _ = _toy_step(toy, ["same"])
    pruners = {m: Recorder(m, SparsityConfig(0.5), layer_name=n) for n, m in toy.named_children()}
    assert feed_statistics(step, pruners) == []
    assert seen == [("a", (2, 5, 8)), ("b", (2, 5, 8)), ("c", (2, 5, 6)), ("c", (2, 5, 6))]


class _Chain(nn.Module):
    """a, b, c once each, in order; ``mode='skip'`` leaves c out (a data-dependent layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.c_runs = 0  # times c computed its output
        self.c.register_forward_hook(lambda *_: setattr(self, "c_runs", self.c_runs + 1))

    def forward(self, x, mode="all"):
        y = self.b(self.a(x).relu())
        return y if mode == "skip" else self.c(y)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_statistics_forward_stops_after_the_last_linear(method):
    """Once two calls ran a, b, c once each in the same order, later calls end as c gets its input: c never
    runs again, and every statistic equals the one of whole calls."""
    got = {}
    for stop in (True, False):
        torch.manual_seed(0)
        toy = _Chain()
        xs = [torch.randn(2, 5, 8) for _ in range(5)]
        step = LayerStep(0, "toy", toy, xs, [((), {})] * 5, torch.device("cpu"), False)
        pruners = {m: get_method(method)(m, SparsityConfig(0.5), layer_name=n) for n, m in
                   [("a", toy.a), ("b", toy.b), ("c", toy.c)]}
        stats = LayerStatistics(pruners, stop_early=stop)
        step.forward(stats.hooks(toy), pre_hooks=stats.pre_hooks())
        assert stats.calls == 5 and stats.stopped == (3 if stop else 0)
        assert toy.c_runs == (2 if stop else 5)
        assert stats.stop_after is (toy.c if stop else None)
        accs = {g.names[0]: g.accumulator for g in stats.groups}
        stats.deliver()
        got[stop] = {n: {k: v.clone() for k, v in a.tensors().items()} if hasattr(a, "tensors") else a.finalize()
                     for n, a in accs.items()}
    for n in ("a", "b", "c"):
        a, b = got[True][n], got[False][n]
        if isinstance(a, dict):
            for k in a:
                assert torch.equal(a[k], b[k])
        else:
            assert torch.equal(a, b)


def test_statistics_forward_runs_whole_calls_where_the_order_varies():
    """A Linear skipped in the second call (routing): no call is ended early and every input is counted."""
    toy = _Chain()
    modes = ["all", "skip", "all", "all"]
    step = LayerStep(0, "toy", toy, [torch.randn(2, 5, 8) for _ in modes], [((), {"mode": m}) for m in modes],
                     torch.device("cpu"), False)
    pruners = _wanda_pruners(toy)
    stats = LayerStatistics(pruners)
    step.forward(stats.hooks(toy), pre_hooks=stats.pre_hooks())
    assert stats.stopped == 0 and stats.stop_after is None and toy.c_runs == 3
    stats.deliver()
    assert pruners[toy.c].stats.nsamples == 3 * 2  # three calls of two windows


def test_stop_forward_with_kept_outputs_is_refused():
    from llmprune_kernels.pipeline.layerwise import StopForward

    toy = _Chain()
    step = LayerStep(0, "toy", toy, [torch.randn(2, 5, 8)], [((), {})], torch.device("cpu"), False)

    def stop(mod, args):
        raise StopForward

    with pytest.raises(RuntimeError, match="outputs are needed"):
        step.forward(pre_hooks={toy.b: stop}, keep=True)
