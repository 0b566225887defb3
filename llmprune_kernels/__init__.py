"""llmprune_kernels: exact, fast post-training pruning of LLMs and 2:4 sparse inference.

The top level holds what a user of the whole job needs; everything else is importable from its module
(``llmprune_kernels.ops.score_mask``, ``llmprune_kernels.ops.sparsegpt``, ``llmprune_kernels.reference``,
``llmprune_kernels.sparse24``, ``llmprune_kernels.pipeline``).
"""
from llmprune_kernels import _ext, library  # noqa: F401  (loads _C or warns once; defines the ops)
from llmprune_kernels.backends import backends
from llmprune_kernels.methods import available_methods, get_method, register_method
from llmprune_kernels.pipeline import PruneResult, prune_model, prune_pretrained
from llmprune_kernels.pipeline.data import get_calibration_and_eval
from llmprune_kernels.pipeline.evaluate import perplexity
from llmprune_kernels.pipeline.models import load_model
from llmprune_kernels.pipeline.save import save_model
from llmprune_kernels.sparse24 import SemiSparseWeightConfig, SparseLinear, pack_24, sparsify_
from llmprune_kernels.sparse24.checkpoint import expand_to_dense, load_compressed, save_compressed
from llmprune_kernels.validation import SparsityConfig

from llmprune_kernels._version import __version__  # noqa: F401  (the package version)

__all__ = [
    "PruneResult",
    "SemiSparseWeightConfig",
    "SparseLinear",
    "SparsityConfig",
    "available_methods",
    "backends",
    "expand_to_dense",
    "get_calibration_and_eval",
    "get_method",
    "load_compressed",
    "load_model",
    "pack_24",
    "perplexity",
    "prune_model",
    "prune_pretrained",
    "register_method",
    "save_compressed",
    "save_model",
    "sparsify_",
]
