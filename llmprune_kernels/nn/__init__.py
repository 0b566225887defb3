"""Drop-in modules: ``SparseLinear`` (2:4 inference) and ``sparsify_``."""
from llmprune_kernels.nn.sparse_linear import SparseLinear, sparsify_

__all__ = ["SparseLinear", "sparsify_"]
