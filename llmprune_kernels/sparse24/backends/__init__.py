"""2:4 matmul backends, one module each, registered here in the order that breaks ties between equal times.

``dense`` (F.linear on the masked weight), ``decode`` (Triton, small M), ``cusparselt`` (cuSPARSELt with
cached plans, large M), ``mmasp`` (our mma.sp CUDA kernel, M <= 16, sm_90), ``cutlass`` (CUTLASS's sm90
wgmma.sp GEMM, large M), ``decode8`` (Triton, M <= 16, 8-bit weights only), ``mmasp8`` (the mma.sp kernel on
8-bit per-channel weights, M <= 16), ``cslt8`` (cuSPARSELt 8-bit x 8-bit with per-token activation
quantisation, M > 16, opted-in 8-bit per-channel weights only). See :mod:`.base` for the
interface.
"""
from llmprune_kernels.sparse24.backends.base import Backend, get, names, register, registered, unregister
from llmprune_kernels.sparse24.backends.cslt8 import Cslt8Backend
from llmprune_kernels.sparse24.backends.cusparselt import CusparseltBackend
from llmprune_kernels.sparse24.backends.cutlass_sm90 import CutlassBackend
from llmprune_kernels.sparse24.backends.decode import DecodeBackend
from llmprune_kernels.sparse24.backends.decode8 import Decode8Backend
from llmprune_kernels.sparse24.backends.dense import DenseBackend
from llmprune_kernels.sparse24.backends.mmasp import MmaspBackend
from llmprune_kernels.sparse24.backends.mmasp8 import Mmasp8Backend

register(DenseBackend())
register(DecodeBackend())
register(CusparseltBackend())
register(MmaspBackend())
register(CutlassBackend())
register(Decode8Backend())
register(Mmasp8Backend())
register(Cslt8Backend())

__all__ = ["Backend", "get", "names", "register", "registered", "unregister"]
