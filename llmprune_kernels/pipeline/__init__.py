"""The whole job on a ``transformers`` causal LM: load, calibrate layer by layer, prune, evaluate, save, report."""
from llmprune_kernels.pipeline.prune import LinearStats, PruneResult, prune_model

__all__ = ["LinearStats", "PruneResult", "prune_model"]
