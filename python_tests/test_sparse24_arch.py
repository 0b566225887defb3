"""What each GPU generation and build may dispatch to, on the CPU: ``_ext``'s build flags, the loaded code's arch
and torch's device queries are replaced by those of three set-ups, and every 2:4 backend's ``usable``, the untuned
dispatch and the 8-bit format's checks are asked about the LLaMA-7B shapes.

* ``a100``: an Ampere GPU (8.0) with an ``8.0`` build: no CUTLASS (sm_90a only), mma.sp without clusters,
  no FP8 anywhere (the 8-bit format is INT8: mma.sp8 and cuSPARSELt's INT8 sparse tensor cores);
* ``h100_ptx``: an H100 running an ``8.0+PTX`` build (the PTX compiled at load, no Hopper paths): no CUTLASS,
  no clusters, no FP8 in our mma.sp code, while Triton (compiled for the GPU itself) and torch's cuSPARSELt
  keep FP8;
* ``h100``: an H100 with the ``9.0`` (9.0a) build: every path.

The GPU run of the ``8.0+PTX`` build checks the same rules on the real code (``test_sparse24_mmasp.py``'s
``test_cuda_code_arch_decides_splits_and_widths`` and the CUDA tests of every backend).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmprune_kernels import _ext
from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.backends import cslt8, cutlass_sm90, mmasp, mmasp8
from llmprune_kernels.sparse24.quant8 import check_fp8_device

SETUPS = {  # capability, code arch of the loaded _C, CUTLASS built, opt-in shared memory per block, SMs
    "a100": ((8, 0), 800, False, 163 * 1024, 108),
    "h100_ptx": ((9, 0), 800, False, 227 * 1024, 132),
    "h100": ((9, 0), 900, True, 227 * 1024, 132),
}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CUDA = torch.device("cuda", 0)


@pytest.fixture(params=list(SETUPS))
def setup(request, monkeypatch):
    cap, code, cutlass, smem, sms = SETUPS[request.param]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(shared_memory_per_block_optin=smem, multi_processor_count=sms,
                                                                   major=cap[0], minor=cap[1], name=request.param))
    monkeypatch.setattr(_ext, "ext_with_cuda", lambda: True)
    monkeypatch.setattr(_ext, "ext_with_cusparselt", lambda: True)
    monkeypatch.setattr(_ext, "ext_with_cutlass_sm90", lambda: cutlass)
    monkeypatch.setattr(_ext, "ext_cuda_code_arch", lambda device=0: code)
    monkeypatch.setattr(cutlass_sm90, "_IS_SM90", {})
    monkeypatch.setattr(mmasp8, "op_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    return request.param


def test_untuned_dispatch_picks_only_paths_this_build_has(setup):
    for out_f, in_f in SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            for m in (1, 4, 16, 64, 2048, 8192):
                c = dispatch.default_choice(out_f, in_f, dtype, m, CUDA)
                b = backends.get(c.path)
                assert b.usable(out_f, in_f, dtype, CUDA) and b.serves(m), (setup, out_f, in_f, m, c.path)
                if c.path == "mmasp":
                    cfg, _ = b.resolve(None, out_f, in_f, dtype, m, CUDA, False)
                    assert cfg[2] <= mmasp.max_splits(CUDA) and mmasp.config_fits(m, in_f, cfg, CUDA)
    hopper_build = setup == "h100"
    assert backends.get("cutlass").usable(4096, 4096, torch.float16, CUDA) == hopper_build
    assert mmasp.max_splits(CUDA) == (8 if hopper_build else 1)  # thread-block clusters: sm_90 code only


def test_8bit_paths_follow_the_gpu_and_the_build(setup):
    fp8, int8 = torch.float8_e4m3fn, torch.int8
    fp8_gpu = setup != "a100"
    for out_f, in_f in SHAPES:
        for name in ("decode8", "cslt8"):
            assert backends.get(name).usable(out_f, in_f, int8, CUDA), (setup, name)  # INT8 everywhere
        # the mma.sp kernel on 8-bit values: where the 16-bit one fits (without clusters, one CTA holds x's whole
        # width: 11008 columns at M = 16 exceed shared memory), FP8 with sm_89 code only
        fits = backends.get("mmasp").usable(out_f, in_f, torch.float16, CUDA)
        assert fits == (setup == "h100" or in_f == 4096)
        assert backends.get("mmasp8").usable(out_f, in_f, int8, CUDA) == fits
        assert backends.get("mmasp8").usable(out_f, in_f, fp8, CUDA) == (fits and setup == "h100")
        assert backends.get("decode8").usable(out_f, in_f, fp8, CUDA) == fp8_gpu  # Triton: compiled for the GPU
        assert backends.get("cslt8").usable(out_f, in_f, fp8, CUDA) == fp8_gpu  # torch's cuSPARSELt
        for name in ("decode8", "mmasp8", "cslt8"):
            assert not backends.get(name).supports(out_f, in_f, torch.float16)  # never for 16-bit modules
    assert cslt8.available()
    if fp8_gpu:
        check_fp8_device(fp8, CUDA)
    else:
        with pytest.raises(ValueError, match=r"FP8 \(compute capability 8.9 or newer\); cuda:0 has 8.0: use 'int8'"):
            check_fp8_device(fp8, CUDA)
    check_fp8_device(int8, CUDA)


# ----------------------------------------------------------------------------- the mma.sp ops' call checks
def _layouts():
    from llmprune_kernels.sparse24.pack import pack_24
    from llmprune_kernels.sparse24.quant8 import quantize_24
    from llmprune_kernels.testing import random_24_weight

    w = random_24_weight(64, 256, torch.float16)
    return (mmasp.to_mmasp_layout(pack_24(w)), mmasp8.to_mmasp8_layout(quantize_24(w, "fp8")),
            mmasp8.to_mmasp8_layout(quantize_24(w, "int8")))


def test_mmasp_calls_name_the_bad_argument_before_any_work():
    lay16, lay8, _ = _layouts()
    for call, lay in ((mmasp.mmasp_linear, lay16), (mmasp8.mmasp8_linear, lay8)):
        with pytest.raises(ValueError, match="x has 255 input features; the weight has 256"):
            call(torch.randn(2, 255).half(), lay)
        for rows in (0, 17):
            with pytest.raises(ValueError, match=rf"takes 1\.\.16 rows, got {rows}"):
                call(torch.randn(rows, 256).half(), lay)
        with pytest.raises(RuntimeError, match="needs the CUDA build .* x is on cpu"):
            call(torch.randn(2, 256).half(), lay)
    with pytest.raises(ValueError, match="x dtype torch.bfloat16 differs from the weight's torch.float16"):
        mmasp.mmasp_linear(torch.randn(2, 256).bfloat16(), lay16)
    with pytest.raises(ValueError, match="x dtype torch.float32 is not supported by the 8-bit mma.sp kernel"):
        mmasp8.mmasp8_linear(torch.randn(2, 256), lay8)


def _on_fake_cuda(layout):
    """The layout with every tensor replaced by an uninitialised CUDA one (inside a FakeTensorMode)."""
    return type(layout)(**{k: (torch.empty(v.shape, dtype=v.dtype, device="cuda") if torch.is_tensor(v) else v)
                           for k, v in vars(layout).items()})


def test_mmasp_call_configs_follow_the_loaded_code(setup):
    """On (fake) CUDA tensors of each set-up: a cluster config where the code has none, FP8 values without sm_89
    code, a config whose x slice does not fit shared memory and a bias of the wrong length are refused with what
    is allowed, before the op runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmprune_kernels.sparse24.quant8 import quantize_24
    from llmprune_kernels.testing import random_24_weight

    cpu = _layouts()
    wide_cpu = mmasp8.to_mmasp8_layout(quantize_24(random_24_weight(16, 11008, torch.float16), "int8"))
    with FakeTensorMode():
        lay16, lay8, _ = (_on_fake_cuda(lay) for lay in cpu)
        x = torch.empty(4, 256, device="cuda", dtype=torch.float16)
        if setup != "h100":
            with pytest.raises(ValueError, match=r"runs at most 1 split\(s\) \(thread-block clusters need sm_90"):
                mmasp.mmasp_linear(x, lay16, config=(4, 1, 8))
            with pytest.raises(ValueError, match="FP8 e4m3 values need sm_89 code"):
                mmasp8.mmasp8_linear(x, lay8)
        wide = _on_fake_cuda(wide_cpu)
        x16 = torch.empty(16, 11008, device="cuda", dtype=torch.float16)
        for rows_per_warp in (1, 2):  # the whole 11008-wide x slice of one CTA: 352 KB at M = 16
            with pytest.raises(ValueError, match=r"needs \d+ bytes of shared memory for in_features=11008, M=16"):
                mmasp8.mmasp8_linear(x16, wide, config=(4, rows_per_warp, 1))
        with pytest.raises(ValueError, match="bias must be a torch.float16 vector of 64"):
            mmasp.mmasp_linear(x, lay16, torch.empty(63, device="cuda", dtype=torch.float16), config=(4, 1, 1))
