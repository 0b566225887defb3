"""Layer pruners the pipeline can use, by name (see ``available_methods()``)."""
from llmprune_kernels.methods.base import LayerPruner, available_methods, get_method, register_method
from llmprune_kernels.methods import magnitude, wanda  # noqa: F401  (registration)
from llmprune_kernels.methods import gblm  # noqa: F401  (registration)
from llmprune_kernels.methods import sparsellm  # noqa: F401  (registration)
from llmprune_kernels.methods import sparsegpt  # noqa: F401  (registration)

__all__ = ["LayerPruner", "available_methods", "get_method", "register_method"]
