"""Shared test fixtures: seeded RNG and a CUDA marker that skips on CPU-only machines."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run under the Triton interpreter on CPU tensors. The variable is read
# when kernels are decorated, so it must be set before any llmprune_kernels.ops module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    """Every test that takes ``device`` runs on the CPU and, where present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture
def tdevice(device):
    """Devices Triton runs on here: CUDA, or CPU under the Triton interpreter."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (set by conftest when no GPU is present)")
    return device


@pytest.fixture(scope="session")
def cli_model_dir(tmp_path_factory):
    """A saved tiny LLaMA (``model/``) and a calibration/evaluation text (``text.txt``) for the command tests."""
    from tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

    from llmprune_kernels.pipeline.save import save_model

    root = tmp_path_factory.mktemp("cli_model")
    save_model(tiny_model("llama"), tiny_tokenizer(), root / "model")
    (root / "text.txt").write_text(SAMPLE_TEXT * 30)
    return root
