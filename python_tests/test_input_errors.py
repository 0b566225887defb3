"""Bad input to the pruners, packing, data helpers and loader: a clear error naming the value, or the
documented behaviour, never a silent wrong result or an error from deep inside torch / transformers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, random_ids, tiny_model

from llmprune_kernels.ops import sparsegpt as ops_sgpt
from llmprune_kernels.ops.score_mask import score_and_mask
from llmprune_kernels.reference import sparsegpt as ref_sgpt
from llmprune_kernels.reference.wanda import wanda_prune_
from llmprune_kernels.validation import SparsityConfig, check_nm

UNSTRUCTURED, TWO_FOUR = SparsityConfig(0.5), SparsityConfig(n=2, m=4)


def _layer(rows=8, cols=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(64, cols, generator=gen)
    return W, X.T @ X / 64


def _sparsegpt_backends():
    backends = [("reference", lambda W, H, c, **kw: ref_sgpt.sparsegpt_prune(W, H, c, blocksize=16, **kw))]
    if ops_sgpt.ext_available("cpu"):
        backends.append(("ext", lambda W, H, c, **kw: ops_sgpt.sparsegpt_prune(W, H, c, blocksize=16,
                                                                              backend="ext", **kw)[0]))
    return backends


@pytest.mark.parametrize("backend, prune", _sparsegpt_backends(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("config", [UNSTRUCTURED, TWO_FOUR], ids=["0.5", "2:4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sparsegpt_rejects_a_non_finite_weight(backend, prune, config, bad):
    W, H = _layer()
    W[3, 5] = bad
    nan, inf = (1, 0) if math.isnan(bad) else (0, 1)
    with pytest.raises(ValueError, match=rf"^down_proj: weight contains {nan} NaN and {inf} Inf values; "
                                         r"pruning needs finite inputs$"):
        prune(W, H, config, name="down_proj")


@pytest.mark.parametrize("fn", ["wanda_prune_", "score_and_mask"])
def test_wanda_rejects_negative_activation_norms(fn):
    W, _ = _layer()
    norms = torch.rand(16)
    norms[6] = -0.25
    prune = wanda_prune_ if fn == "wanda_prune_" else score_and_mask
    with pytest.raises(ValueError, match=r"activation norms hold 1 negative value\(s\), the first -0.25 at flat "
                                         r"index 6; allowed: values >= 0"):
        prune(W, norms, UNSTRUCTURED)
    norms[6] = -0.0  # a signed zero is not negative
    assert prune(W.clone(), norms, UNSTRUCTURED).sum() == 8 * 8


@pytest.mark.parametrize("norm", [float("nan"), float("inf")])
def test_wanda_rejects_non_finite_activation_norms(norm):
    W, _ = _layer()
    norms = torch.rand(16)
    norms[2] = norm
    for prune in (wanda_prune_, score_and_mask):
        with pytest.raises(ValueError, match="activation norms contains .* pruning needs finite inputs"):
            prune(W.clone(), norms, TWO_FOUR)


@pytest.mark.parametrize("bad", [-1, -5, 1.5, True])
def test_max_retries_must_be_a_non_negative_integer(bad):
    W, H = _layer()
    msg = rf"max_retries {bad!r} is invalid; allowed: an integer >= 0"
    with pytest.raises(ValueError, match=msg):
        ref_sgpt.sparsegpt_prune(W, H, UNSTRUCTURED, max_retries=bad)
    with pytest.raises(ValueError, match=msg):
        ref_sgpt.inverse_hessian_factor(H, 0.01, bad)
    with pytest.raises(ValueError, match=msg):
        ops_sgpt.sparsegpt_prune(W, H, UNSTRUCTURED, max_retries=bad)


def test_zero_retries_still_prune():
    W, H = _layer()
    res = ref_sgpt.sparsegpt_prune(W, H, UNSTRUCTURED, blocksize=16, max_retries=0)
    assert res.retries == 0 and int(res.mask.sum()) == W.numel() // 2


def test_pack_24_and_sparse_linear_take_zero_rows():
    from llmprune_kernels.sparse24 import SparseLinear, sparsify_
    from llmprune_kernels.sparse24.pack import pack_24, unpack_24

    packed = pack_24(torch.zeros(0, 12))
    assert packed.values.shape == (0, 6) and packed.meta.shape == (0, 2)
    assert unpack_24(packed).shape == (0, 12)
    x = torch.randn(3, 12)
    assert SparseLinear(12, 0)(x).shape == (3, 0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 0))
    sparsify_(model)
    assert isinstance(model[0], SparseLinear) and model(x).shape == (3, 0)
    with pytest.raises(ValueError, match="in_features to be a positive multiple of 4 .*got 0"):
        SparseLinear(0, 4)
    with pytest.raises(ValueError, match="out_features -1 is invalid; allowed: an integer >= 0"):
        SparseLinear(8, -1)


def test_a_float_where_a_config_belongs_names_the_fix():
    from llmprune_kernels.sparse24 import sparsify_

    W, H = _layer()
    msg = r"config 0.5 \(float\) is not a SparsityConfig; for 0.5 unstructured pass SparsityConfig\(0.5\)"
    for call in (lambda: score_and_mask(W, torch.ones(16), 0.5), lambda: wanda_prune_(W, torch.ones(16), 0.5),
                 lambda: ref_sgpt.sparsegpt_prune(W, H, 0.5), lambda: ops_sgpt.sparsegpt_prune(W, H, 0.5)):
        with pytest.raises(TypeError, match=msg):
            call()
    with pytest.raises(TypeError, match=r"config '2:4' \(str\) is not a SparsityConfig; for a pattern pass "
                                        r"SparsityConfig.parse\(pattern='2:4'\)"):
        score_and_mask(W, torch.ones(16), "2:4")
    with pytest.raises(TypeError, match=r"filter_fn 0.5 \(float\) is not callable; .* sparsify_ takes no sparsity"):
        sparsify_(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5)


def test_numpy_integers_make_a_valid_pattern():
    cfg = SparsityConfig(n=np.int64(2), m=np.int32(4))
    assert cfg == TWO_FOUR and type(cfg.n) is int and type(cfg.m) is int and cfg.label == "2:4"
    check_nm(np.int64(2), np.int64(4), 8)
    with pytest.raises(ValueError, match=r"N:M pattern 4:4 is invalid: allowed 1 <= N < M"):
        SparsityConfig(n=np.int64(4), m=np.int64(4))
    with pytest.raises(TypeError, match=r"N 2.0 \(float\) is not an integer"):
        SparsityConfig(n=2.0, m=4)
    with pytest.raises(TypeError, match=r"M '4' \(str\) is not an integer"):
        check_nm(2, "4")


def test_sparsity_must_agree_with_the_pattern():
    with pytest.raises(ValueError, match=r"sparsity 0.3 contradicts the N:M pattern 2:4 \(sparsity 0.5\); allowed: "
                                         r"leave sparsity out for N:M, or give exactly n/m"):
        SparsityConfig(sparsity=0.3, n=2, m=4)
    with pytest.raises(ValueError, match="sparsity 0.5 contradicts the N:M pattern 1:4"):
        SparsityConfig(0.5, 1, 4)
    assert SparsityConfig(sparsity=0.5, n=2, m=4) == TWO_FOUR
    assert SparsityConfig(n=1, m=4).sparsity == 0.25 and SparsityConfig(1 / 3, 1, 3).sparsity == 1 / 3
    assert SparsityConfig().sparsity == 0.5 and SparsityConfig() == UNSTRUCTURED


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # vocabulary 320, max_position_embeddings 256


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(2, 0, dtype=torch.long), r"evaluation windows have shape \(2, 0\); allowed: at least 1 window of "
                                          r"at least 2 token"),
    (torch.zeros(0, 8, dtype=torch.long), r"have shape \(0, 8\); allowed: at least 1 window"),
    (torch.full((1, 8), VOCAB), rf"hold token id {VOCAB}, outside the model's vocabulary; allowed: ids in "
                                rf"\[0, {VOCAB - 1}\]"),
    (torch.full((1, 8), -1), r"hold token id -1, outside the model's vocabulary"),
    (random_ids(1, 257), r"are 257 tokens long, longer than the model's max_position_embeddings 256; allowed: a "
                         r"sequence length <= 256"),
    (torch.zeros(1, 8, dtype=torch.int32), r"must be a 2-D int64 tensor \(n, seqlen\) of token ids, got \(1, 8\) "
                                           r"torch.int32"),
])
def test_perplexity_checks_windows_against_the_model(model, ids, message):
    from llmprune_kernels.pipeline.evaluate import perplexity

    with pytest.raises(ValueError, match=message):
        perplexity(model, ids)


def test_check_windows_for_calibration(model):
    from llmprune_kernels.pipeline.data import check_windows, model_limits

    assert model_limits(model) == (VOCAB, 256)
    check_windows(random_ids(2, 256), model)  # the longest allowed window
    check_windows(torch.zeros(1, 1, dtype=torch.long), model)  # calibration windows may be one token long
    with pytest.raises(ValueError, match=r"^calibration windows have shape \(1, 0\)"):
        check_windows(torch.zeros(1, 0, dtype=torch.long), model)
    with pytest.raises(ValueError, match=r"^calibration windows hold token id 999"):
        check_windows(torch.full((3, 4), 999), model)
    with pytest.raises(ValueError, match=r"got list"):
        check_windows([[1, 2]], model)


def test_nan_perplexity_is_nan_not_inf():
    from llmprune_kernels.pipeline.evaluate import perplexity

    broken = tiny_model("llama")
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    assert math.isnan(perplexity(broken, random_ids(1, 8)))


def test_loader_never_runs_code_from_the_model_directory(tmp_path, monkeypatch):
    import transformers
    from tiny_models import tiny_tokenizer

    from llmprune_kernels.pipeline.models import load_model

    (tmp_path / "config.json").write_text("{}")
    seen = {}

    def recorder(what, result):
        def from_pretrained(*args, **kwargs):
            seen[what] = kwargs
            return result
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder("model", tiny_model("llama")))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer", tiny_tokenizer()))
    load_model(tmp_path)
    assert seen["model"]["trust_remote_code"] is False and seen["tokenizer"]["trust_remote_code"] is False


def test_pack_24_round_trip_keeps_signed_zeros_where_two_slots_hold_them():
    import llmprune_kernels.sparse24.pack as pack

    def bits(t):
        return t.view(torch.int32).tolist()

    # at most two nonzero bit patterns per group: bit for bit
    exact = torch.tensor([[-0.0, 0.0, 1.5, 0.0, -0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0]])
    assert bits(pack.unpack_24(pack.pack_24(exact))) == bits(exact)
    # three -0.0 in a group: equal values, and the -0.0 beyond the two kept slots comes back as +0.0
    crowded = torch.tensor([[-0.0, -0.0, -0.0, 1.0]])
    back = pack.unpack_24(pack.pack_24(crowded))
    assert torch.equal(back, crowded) and bits(back) == bits(torch.tensor([[-0.0, 0.0, 0.0, 1.0]]))
    doc = " ".join(pack.__doc__.split())
    assert "bit for bit wherever a group of 4 holds at most two nonzero bit patterns" in doc
    assert "come back as ``+0.0``" in doc


def test_prune_model_checks_config_and_windows_before_work():
    """A float config and out-of-vocabulary or empty windows are refused before the model is touched."""
    from llmprune_kernels import prune_model

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="SparsityConfig"):
        prune_model(model, random_ids(2, 8), "wanda", 0.5, progress=False)
    bad = random_ids(2, 8)
    bad[0, 0] = model.config.vocab_size
    with pytest.raises(ValueError, match="calibration windows"):
        prune_model(model, bad, "gblm", progress=False)
    with pytest.raises(ValueError, match="calibration windows"):
        prune_model(model, torch.zeros(0, 8, dtype=torch.long), "wanda", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gblm_reference_refuses_negative_activation_norms():
    from llmprune_kernels.reference.gblm import gblm_mask

    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="activation norms"):
        gblm_mask(w, -torch.ones(8), torch.ones(4, 8), SparsityConfig(0.5))
