"""llmprune_kernels: exact, fast post-training pruning of LLMs and 2:4 sparse inference."""
from llmprune_kernels import _ext  # noqa: F401  (loads _C or warns once)
from llmprune_kernels.backends import backends
from llmprune_kernels.methods import LayerPruner, available_methods, get_method
from llmprune_kernels.sparse24 import SparseLinear, sparsify_
from llmprune_kernels.ops.act_norm import TritonActNormStats, act_norm_update_
from llmprune_kernels.ops.score_mask import pack_mask_bits, score_and_mask, unpack_mask_bits
from llmprune_kernels.reference.magnitude import magnitude_mask, magnitude_prune_
from llmprune_kernels.reference.ria import ria_mask, ria_score
from llmprune_kernels.reference.wanda import ActNormStats, wanda_mask, wanda_prune_, wanda_score
from llmprune_kernels.sparse24 import Packed24, pack_24, to_torch_semi_structured, unpack_24
from llmprune_kernels.sparse24.checkpoint import expand_to_dense, load_compressed, save_compressed
from llmprune_kernels.validation import SparsityConfig
from llmprune_kernels.pipeline.data import calibration_windows, eval_windows, get_calibration_and_eval, load_text
from llmprune_kernels.pipeline.evaluate import perplexity
from llmprune_kernels.pipeline.models import find_decoder_layers, load_model
from llmprune_kernels.pipeline.layerwise import capture_layer_inputs, walk_layers
from llmprune_kernels.pipeline import PruneResult, prune_model
from llmprune_kernels.pipeline.report import build_report, write_json
from llmprune_kernels.pipeline.save import save_model

__version__ = "0.1.0"

__all__ = [
    "PruneResult",
    "build_report",
    "calibration_windows",
    "capture_layer_inputs",
    "eval_windows",
    "find_decoder_layers",
    "get_calibration_and_eval",
    "load_model",
    "load_text",
    "perplexity",
    "prune_model",
    "save_model",
    "walk_layers",
    "write_json",
    "unpack_24",
    "to_torch_semi_structured",
    "sparsify_",
    "save_compressed",
    "pack_24",
    "load_compressed",
    "expand_to_dense",
    "SparseLinear",
    "Packed24",
    "ActNormStats",
    "LayerPruner",
    "SparsityConfig",
    "TritonActNormStats",
    "act_norm_update_",
    "available_methods",
    "backends",
    "get_method",
    "magnitude_mask",
    "magnitude_prune_",
    "pack_mask_bits",
    "ria_mask",
    "ria_score",
    "score_and_mask",
    "unpack_mask_bits",
    "wanda_mask",
    "wanda_prune_",
    "wanda_score",
]
