"""Layer pruners the pipeline can use, by name (see ``available_methods()``), and their typed options."""
from llmprune_kernels.methods.base import (
    LayerPruner, OptionInfo, available_methods, check_options, get_method, method_options, option, register_method,
)
from llmprune_kernels.methods import magnitude, wanda  # noqa: F401  (registration)
from llmprune_kernels.methods import gblm  # noqa: F401  (registration)
from llmprune_kernels.methods import sparsellm  # noqa: F401  (registration)
from llmprune_kernels.methods import sparsegpt  # noqa: F401  (registration)
from llmprune_kernels.methods import refine  # noqa: F401  (METHOD+REFINEMENT names)
from llmprune_kernels.methods import admm  # noqa: F401  (registration)

__all__ = ["LayerPruner", "OptionInfo", "available_methods", "check_options", "get_method", "method_options",
           "option", "register_method"]
