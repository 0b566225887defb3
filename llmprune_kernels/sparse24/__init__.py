"""2:4 sparse inference: packing, compressed checkpoints, backends behind one dispatch, ``SparseLinear``."""
from llmprune_kernels.sparse24.pack import Packed24, check_24, mask_24, pack_24, to_torch_semi_structured, unpack_24
from llmprune_kernels.sparse24.linear import SparseLinear
from llmprune_kernels.sparse24.sparsify import SemiSparseWeightConfig, semi_sparse_weight, sparsify_

__all__ = ["Packed24", "SemiSparseWeightConfig", "SparseLinear", "check_24", "mask_24", "pack_24",
           "semi_sparse_weight", "sparsify_", "to_torch_semi_structured", "unpack_24"]
