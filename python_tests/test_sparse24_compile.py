"""torch.compile of 2:4 modules: 8-bit modules trace decode8's op (``llmprune_kernels::sparse24_mm8``: the 8-bit
weight, not a 16-bit fallback) with and without gradients, a compiled Hugging Face decode (static KV cache)
equals the eager one, and the op's registrations pass ``torch.library.opcheck``. On CPU the kernel runs under the
Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels import SemiSparseWeightConfig, SparsityConfig, prune_model, sparsify_
from llmprune_kernels.sparse24.linear8 import SparseLinear8
from llmprune_kernels.sparse24.quant8 import quantize_24
from llmprune_kernels.testing import random_24_weight
from test_sparse24_8bit import CUDA_WDTYPES, _linear, check_kernel


def _recorder(seen: list):
    """A torch.compile backend that notes every op of the graphs it is given and runs them eagerly."""
    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    return backend


@pytest.mark.parametrize("wdtype, group", [("fp8", None), ("int8", 32)])
def test_compiled_module_traces_the_8bit_decode_op(wdtype, group, tdevice):
    """torch.compile(fullgraph=True) of an 8-bit module traces decode8's op (``sparse24_mm8``: 8-bit weights,
    not the 16-bit fallback) and gives the eager bits; with grad the op's formula gives the dequantised
    weight's gradients."""
    if tdevice.type != "cpu":
        pytest.skip("the CUDA dispatch is tested below")
    torch._dynamo.reset()
    sl = SparseLinear8.from_linear(_linear(24, 64, dtype=torch.float16), wdtype, group_size=group)
    sl.force_path = "decode8"
    x = torch.randn(2, 3, 64).half()
    seen: list = []
    backend = _recorder(seen)
    with torch.no_grad():
        y = torch.compile(sl, backend=backend, fullgraph=True)(x)
    assert torch.equal(y, sl(x)) and any("sparse24_mm8" in t for t in seen), seen
    check_kernel(y.reshape(6, 24), x.reshape(6, 64), sl.quantized(), sl.bias)
    seen.clear()
    xg = x.clone().requires_grad_()
    torch.compile(sl, backend=backend, fullgraph=True)(xg).float().sum().backward()
    assert any("sparse24_mm8" in t for t in seen), seen  # the op's own gradient: no 16-bit fallback
    xr = x.clone().requires_grad_()
    F.linear(xr.float(), sl.weight.float(), sl.bias.detach().float()).sum().backward()
    assert torch.allclose(xg.grad.float(), xr.grad.float(), atol=2e-2, rtol=1e-2)
    assert torch.equal(sl.bias.grad, torch.full((24,), 6.0, dtype=sl.bias.dtype))
    with torch.no_grad():
        xa = torch.randn(2, 8, 64).half()  # M = 16 and M = 17 (above decode8: the fallback, still compiled)
        for xm in (xa, torch.randn(17, 64).half()):
            assert torch.equal(torch.compile(sl, backend="aot_eager", fullgraph=True)(xm), sl(xm))


def test_mm8_op_registration():
    """The op's schema, fake and autograd registrations agree with its kernel (torch.library.opcheck)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
        pytest.skip("the op's kernel needs Triton on CUDA or TRITON_INTERPRET=1")
    from llmprune_kernels.library import sparse24_mm8

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = quantize_24(random_24_weight(32, 64, torch.float16, dev), "int8")
    x, b = torch.randn(3, 64, device=dev).half(), torch.randn(32, device=dev).half()
    torch.library.opcheck(sparse24_mm8, (x, q.values, q.meta, q.scale, b, 64, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_compiled_hf_decode_with_8bit_modules_equals_eager(tdevice):
    """A tiny LLaMA with 8-bit 2:4 decoder Linears: a 6-token prompt and two greedy steps on a static cache,
    eager and through torch.compile(model.forward): the same logits, decode8's op in both graphs (prompt,
    step), no recompile for the second step or a second decode on a new cache."""
    if tdevice.type != "cpu":
        pytest.skip("CPU, under the interpreter")
    from tiny_models import tiny_model
    from transformers import StaticCache

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model("llama")
    prune_model(model, None, "magnitude", SparsityConfig(n=2, m=4), progress=False)
    model = model.half()
    sparsify_(model, SemiSparseWeightConfig(weight_dtype="int8"),
              lambda m, fqn: isinstance(m, nn.Linear) and ".layers." in f".{fqn}")
    mods = [m for m in model.modules() if isinstance(m, SparseLinear8)]
    for m in mods:
        m.force_path = "decode8"  # as the CUDA dispatch runs M <= 16
    prompt, kw = torch.randint(0, 100, (1, 6)), _cache_kw(model)

    def decode(fwd):
        cache = StaticCache(config=model.config, max_cache_len=16)
        out = fwd(input_ids=prompt, cache_position=torch.arange(6), use_cache=True, **{kw: cache}).logits
        logits, pos = [out[:, -1]], torch.tensor([6])
        for _ in range(2):
            tok = out[:, -1:].argmax(-1)
            out = fwd(input_ids=tok, cache_position=pos, position_ids=pos[None], use_cache=True, **{kw: cache}).logits
            logits.append(out[:, -1])
            pos = pos + 1
        return torch.stack(logits)

    seen: list = []
    with torch.no_grad():
        compiled = torch.compile(model.forward, backend=_recorder(seen), dynamic=False)
        got = decode(compiled)
        again = decode(compiled)  # a new cache: the same two graphs, no recompile
        ref = decode(model.forward)
    assert torch.equal(got, ref) and torch.equal(again, ref)
    assert sum("sparse24_mm8" in t for t in seen) == 2 * len(mods)  # every Linear, in the prompt's and the step's graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", CUDA_WDTYPES)
def test_torch_compile_reads_the_8bit_weight_cuda(wdtype):
    """Compiled 8-bit modules (fullgraph, static shapes; a recording backend and inductor) run decode8's op at
    M <= 16, whichever 8-bit kernel tuning chose for eager calls, within the kernel's tolerance."""
    torch._dynamo.reset()
    model = sparsify_(nn.Sequential(_linear(512, 1024, dtype=torch.float16)).cuda(),
                      SemiSparseWeightConfig(weight_dtype=wdtype), buckets=(1, 16))
    sl = model[0]
    seen: list = []
    backend = _recorder(seen)
    with torch.no_grad():
        for m in (1, 16):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
            check_kernel(torch.compile(sl, backend=backend, fullgraph=True, dynamic=False)(x), x, sl.quantized(),
                         sl.bias)
            check_kernel(torch.compile(sl, fullgraph=True, dynamic=False)(x), x, sl.quantized(), sl.bias)
    assert any("sparse24_mm8" in t for t in seen), seen


def test_pinned_choices_exist_before_any_trace():
    """Every built-in backend's pinned choice is made when dispatch is imported: a first ``pinned()`` inside a
    torch.compile trace would add to the dict the trace guards on, and every compiled forward would compile
    again (checked in a fresh interpreter, where nothing has called it yet)."""
    import subprocess
    import sys

    code = ("from llmprune_kernels.sparse24 import backends, dispatch; "
            "assert set(dispatch._PINNED) == set(backends.names()), sorted(dispatch._PINNED)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
