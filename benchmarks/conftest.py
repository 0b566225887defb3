"""Shared benchmark helpers: the environment every results JSON must record (GPU name, versions, date)."""
from __future__ import annotations

import datetime
import platform

import pytest
import torch


def collect_env_info() -> dict:
    """GPU name, torch / triton / CUDA versions, Python, date (UTC)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is optional
        triton_version = None
    info = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
    return info


@pytest.fixture(scope="session")
def env_info() -> dict:
    """The environment dict of ``collect_env_info()``, for a benchmark's results JSON."""
    return collect_env_info()
