"""2:4 sparse inference: packing, dispatch tuning, cuSPARSELt wrapper, compressed checkpoints."""
from llmprune_kernels.sparse24.pack import Packed24, check_24, mask_24, pack_24, to_torch_semi_structured, unpack_24

__all__ = ["Packed24", "check_24", "mask_24", "pack_24", "to_torch_semi_structured", "unpack_24"]
