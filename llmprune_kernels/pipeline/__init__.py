"""The whole job on a ``transformers`` causal LM: load, calibrate layer by layer, prune, evaluate, save, report."""
from llmprune_kernels.pipeline.prune import LinearStats, PruneResult, prune_model
from llmprune_kernels.pipeline.stream import prune_pretrained

__all__ = ["LinearStats", "PruneResult", "prune_model", "prune_pretrained"]
