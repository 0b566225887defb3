"""Shared-memory histogram primitives for the hist select (``score_mask_hist``), in a few lines of PTX.

CUDA only (the interpreter counts with ``tl.histogram``): Triton has no shared-memory atomics on a
histogram it does not hold in registers, and its own ``tl.histogram`` counts with warp ballots, ~100
instructions per key and level at 256 bins. Here a key costs one shared atomic increment per level.
Two static arrays are declared by the kernel (``_DECL``, once at its top level); counters 1028 and 1029
of array 0 hold the row's min and max key.
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

MM_PACK = 32  # keys per thread reduced in one min/max asm instance (the launcher checks pieces divide evenly)

if HAS_TRITON:
    import triton
    import triton.language as tl

    # PTX for the shared-memory histogram (CUDA only; the interpreter takes tl.histogram): two static shared
    # arrays (levels alternate between them, so a level never waits for the previous one's readers) of up to
    # 1024 counters and a spare; Triton's own (dynamic) shared memory never overlaps them.
    _DECL = tl.constexpr(".shared .align 16 .b32 lpk_h0[1032];\n.shared .align 16 .b32 lpk_h1[1032];\n"
                         "mov.u32 $0, 0;")

    def _ptx(region: int):
        """(zero a counter, read a counter, count a key) on array ``lpk_h<region>``."""
        arr = f"lpk_h{region}"
        zero = f"{{ .reg .u32 a; mov.u32 a, {arr}; mad.lo.u32 a, $1, 4, a; st.shared.u32 [a], 0; mov.u32 $0, 0; }}"
        read = f"{{ .reg .u32 a; mov.u32 a, {arr}; mad.lo.u32 a, $1, 4, a; ld.volatile.shared.u32 $0, [a]; }}"
        # digit u = (key - lo) >> s; keys outside [lo, lo + NB << s) (those below lo wrap to huge unsigned
        # values) count in the spare counter NB, which is never read: no branch per key
        add = (f"{{ .reg .u32 u, a; sub.u32 u, $1, $2; shr.u32 u, u, $3; min.u32 u, u, $4; mov.u32 a, {arr}; "
               "mad.lo.u32 a, u, 4, a; red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")
        return tl.constexpr(zero), tl.constexpr(read), tl.constexpr(add)

    _ZERO0, _READ0, _ADD0 = _ptx(0)
    _ZERO1, _READ1, _ADD1 = _ptx(1)
    # the first level on array 0 when every key is valid and in range by construction ([min, max]): no clamp
    _ADD0_IN = tl.constexpr("{ .reg .u32 u, a; sub.u32 u, $1, $2; shr.u32 u, u, $3; mov.u32 a, lpk_h0; "
                            "mad.lo.u32 a, u, 4, a; red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")

    def _ptx_read8(region: int):
        """Read counters 8 * lane .. 8 * lane + 7 of array ``lpk_h<region>`` (two 16-byte shared loads)."""
        return tl.constexpr(f"{{ .reg .u32 a; mov.u32 a, lpk_h{region}; mad.lo.u32 a, $8, 32, a; "
                            "ld.volatile.shared.v4.u32 {$0, $1, $2, $3}, [a]; "
                            "ld.volatile.shared.v4.u32 {$4, $5, $6, $7}, [a+16]; }")

    # The row's min and max key by shared atomics on two more counters of array 0 (1028: min, 1029: max): each
    # warp reduces its keys (MM_PACK per asm instance, then redux.sync) and lane 0 adds the result; one
    # barrier instead of the ~5 of two Triton reductions. Padding keys (-1) are ignored: the largest as u32
    # for the min, the smallest as s32 for the max.
    _INIT_MM = tl.constexpr("{ .reg .u32 a; mov.u32 a, lpk_h0; st.shared.u32 [a+4112], -1; "
                            "st.shared.u32 [a+4116], 0; mov.u32 $0, 0; }")

    def _ptx_minmax(pack: int):
        """PTX adding the min and max of ``pack`` keys of each thread, reduced over the warp, to the two slots."""
        ins = [f"${pack + i}" for i in range(pack)]
        body = [f"min.u32 m, {ins[0]}, {ins[1]};", f"max.s32 x, {ins[0]}, {ins[1]};"]
        body += [f"min.u32 m, m, {r}; max.s32 x, x, {r};" for r in ins[2:]]
        body += ["redux.sync.min.u32 m, m, -1; redux.sync.max.s32 x, x, -1; mov.u32 l, %laneid;",
                 "setp.eq.u32 p, l, 0; @p red.shared.min.u32 [lpk_h0+4112], m; @p red.shared.max.s32 [lpk_h0+4116], x;"]
        body += [f"mov.u32 ${i}, 0;" for i in range(pack)]
        return tl.constexpr("{ .reg .u32 m, x, l; .reg .pred p; " + " ".join(body) + " }"), \
            tl.constexpr(",".join(["=r"] * pack + ["r"] * pack))

    _MM, _MM_CONS = _ptx_minmax(MM_PACK)
    _MM_PACK = tl.constexpr(MM_PACK)
    _READ_MM = tl.constexpr("{ ld.volatile.shared.u32 $0, [lpk_h0+4112]; ld.volatile.shared.u32 $1, [lpk_h0+4116]; }")

    _READ8_0 = _ptx_read8(0)
    _READ8_1 = _ptx_read8(1)

    @triton.jit
    def _hist_zero(NB: tl.constexpr, REGION: tl.constexpr):
        bins = tl.arange(0, NB)
        if REGION == 0:
            tl.inline_asm_elementwise(_ZERO0, "=r,r", [bins], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(_ZERO1, "=r,r", [bins], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _hist_add(key, lo32, s, NB: tl.constexpr, REGION: tl.constexpr, INRANGE: tl.constexpr = False):
        if INRANGE:
            tl.static_assert(REGION == 0)
            tl.inline_asm_elementwise(_ADD0_IN, "=r,r,r,r", [key, lo32, s], dtype=tl.int32, is_pure=False, pack=1)
        elif REGION == 0:
            tl.inline_asm_elementwise(_ADD0, "=r,r,r,r,r", [key, lo32, s, NB], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(_ADD1, "=r,r,r,r,r", [key, lo32, s, NB], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _hist_read(NB: tl.constexpr, REGION: tl.constexpr):
        bins = tl.arange(0, NB)
        if REGION == 0:
            h = tl.inline_asm_elementwise(_READ0, "=r,r", [bins], dtype=tl.int32, is_pure=False, pack=1)
        else:
            h = tl.inline_asm_elementwise(_READ1, "=r,r", [bins], dtype=tl.int32, is_pure=False, pack=1)
        return h

    @triton.jit
    def _hist_read8(REGION: tl.constexpr):
        """The 256 counters of array REGION as 8 [32] tensors: lane l of tensor j holds bin 8 l + j. A [32]
        tensor is replicated in every warp, so each warp scans the bins on its own, with no barrier."""
        lane = tl.arange(0, 32)
        if REGION == 0:
            h = tl.inline_asm_elementwise(_READ8_0, "=r,=r,=r,=r,=r,=r,=r,=r,r", [lane], dtype=(tl.int32,) * 8,
                                          is_pure=False, pack=1)
        else:
            h = tl.inline_asm_elementwise(_READ8_1, "=r,=r,=r,=r,=r,=r,=r,=r,r", [lane], dtype=(tl.int32,) * 8,
                                          is_pure=False, pack=1)
        return h

    @triton.jit
    def _mm_add(key):
        tl.inline_asm_elementwise(_MM, _MM_CONS, [key], dtype=tl.int32, is_pure=False, pack=_MM_PACK)

    @triton.jit
    def _minmax_atomic(key, key2, B2: tl.constexpr):
        """(min, max) of the valid keys of both pieces; the slots were set before the kernel's first barrier."""
        _mm_add(key)
        if B2 > 0:
            _mm_add(key2)
        tl.debug_barrier()
        mn, mx = tl.inline_asm_elementwise(_READ_MM, "=r,=r,r", [tl.arange(0, 1)], dtype=(tl.int32, tl.int32),
                                           is_pure=False, pack=1)
        return tl.max(mn, axis=0), tl.max(mx, axis=0)
