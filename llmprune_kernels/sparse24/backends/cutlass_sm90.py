"""Python side of the CUTLASS sm90 2:4 GEMM in ``csrc/sparse24/cutlass_sm90`` (wgmma.sp, TMA, persistent).

cuSPARSELt 0.8's bf16 kernels are barely faster than dense on the H100 at large M (1.03-1.16x where its
fp16 kernels reach 1.40-1.49x); CUTLASS 3's Hopper sparse GEMM runs both dtypes on the same
instructions. The weight is compressed once per metadata format its tiles read (values + metadata); a
call builds TMA descriptors on the host and launches one kernel, so it is safe in eager mode and in CUDA
graphs. Built only when CUTLASS headers were found at build time (``pip install nvidia-cutlass``) for
sm_90a.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from llmprune_kernels import _ext
from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.pack import Packed24, unpack_24
from llmprune_kernels.validation import check_compressible_24

TILES = ("128x128x64 cluster 2x1", "128x256x64 cluster 1x2", "256x128x64 cluster 2x1",
         "256x128x64 cluster 2x1 stream-K", "256x128x64 cluster 1x2",
         "128x128x64 cluster 2x1 ping-pong", "64x256x64 cluster 1x2 ping-pong",
         "256x128x64 cluster 1x2 stream-K", "256x128x64 cluster 2x2",
         "256x128x128 cluster 1x2", "256x128x128 cluster 1x2 stream-K", "256x128x128 cluster 2x1")
"""Compiled tile configs (weight rows x tokens x K per threadblock, cluster; cooperative persistent kernels
unless marked: stream-K splits the last wave's K loops across SMs, ping-pong overlaps one warp group's
epilogue with the other's main loop). New tiles are appended: saved tables name their tile."""
TILE_FORMATS = tuple(1 if t.split()[0].endswith("x128") else 0 for t in TILES)
"""The metadata format each tile reads: 0 for a K step of 64, 1 for 128 (CUTLASS lays metadata out in atoms of
min(K step, 128) columns). A weight is compressed once per format its configs use."""
FORMATS = (0, 1)
SCHEDULES = 4 * 3
"""Runtime scheduler settings per tile: swizzle 1/2/4/8 x raster order heuristic/along rows/along tokens."""
_LEGACY_TILES = 7
"""Tables written before tiles 7 and 8 existed hold bare config numbers encoded with 7 tiles."""
CONFIGS = range(len(TILES) * SCHEDULES)
"""A config = tile + len(TILES) * (log2(swizzle) + 4 * raster): the tile and the persistent scheduler's swizzle (1, 2,
4, 8) and raster order (0 CUTLASS's heuristic, 1 along weight rows, 2 along tokens)."""
MIN_M = 64
"""Tuning measures this path from this many input rows up (below, the mma.sp and decode kernels win)."""


def cluster_has_work(tile: int, m: int) -> bool:
    """Whether every CTA of the tile's cluster along tokens gets a token tile at ``m`` input rows. A 1x2
    cluster of 128-token tiles at M = 64 leaves one CTA of each pair idle (H100: 0.044 ms against 0.032 for
    the same tile with a 2x1 cluster, 11008x4096 bf16), so the search skips such tiles."""
    shape, _, cluster = TILES[tile].split()[:3]
    tokens, cn = int(shape.split("x")[1]), int(cluster.split("x")[1])
    return -(-m // tokens) >= cn


class CutlassWeight(NamedTuple):
    """A 2:4 weight ``[out_features, in_features]`` in CUTLASS's sm90 compressed form (values with
    CUTLASS's padding, metadata bytes)."""

    values: torch.Tensor
    meta: torch.Tensor
    out_features: int
    in_features: int
    format: int = 0
    """The metadata format (``TILE_FORMATS``): only the tiles of this format can read ``meta``."""

    def nbytes(self) -> int:
        return self.values.nbytes + self.meta.nbytes


def available(device: torch.device | int | None = None) -> bool:
    """The CUTLASS ops were compiled in and the GPU is sm_90."""
    if not (_ext.ext_with_cutlass_sm90() and torch.cuda.is_available()):
        return False
    if isinstance(device, (str, torch.device)):
        device = torch.device(device)
        if device.type != "cuda":
            return False
        device = device.index
    if device not in _IS_SM90:  # asked once per device: SparseLinear.forward asks it under torch.compile
        _IS_SM90[device] = torch.cuda.get_device_capability(device) == (9, 0)
    return _IS_SM90[device]


_IS_SM90: dict[int | None, bool] = {}


def shape_ok(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """fp16 / bf16 weights with out % 8 == 0 and in % 16 == 0 (TMA's 16-byte alignment of every operand)."""
    return dtype in (torch.float16, torch.bfloat16) and out_features % 8 == 0 and in_features % 16 == 0


def _check_config(config: int) -> int:
    if not isinstance(config, int) or config not in CONFIGS:
        raise ValueError(f"CUTLASS 2:4 config must be an int in [0, {len(CONFIGS)}), got {config!r}")
    return int(config)


def describe(config: int) -> str:
    """``tile, swizzle, raster`` in words, for reports."""
    tile, swizzle, raster = _schedule(config)
    return f"{TILES[tile]}, swizzle {swizzle}, raster {('heuristic', 'along rows', 'along tokens')[raster]}"


def _schedule(config: int) -> tuple[int, int, int]:
    c = _check_config(config)
    sched = c // len(TILES)
    return c % len(TILES), 1 << (sched % 4), sched // 4


def config_to_json(config: int) -> dict:
    """A config as saved in tuning tables: the tile by name, so adding tiles never changes its meaning."""
    tile, swizzle, raster = _schedule(config)
    return {"tile": TILES[tile], "swizzle": swizzle, "raster": raster}


def config_from_json(value: dict | int) -> int:
    """Inverse of :func:`config_to_json`; a bare int is a config of a table written with the first 7 tiles."""
    if isinstance(value, dict):
        tile, swizzle, raster = value.get("tile"), value.get("swizzle"), value.get("raster")
        if tile not in TILES or swizzle not in (1, 2, 4, 8) or raster not in (0, 1, 2):
            raise ValueError(f"CUTLASS 2:4 config {value!r} is unknown: tile must be one of {TILES}, swizzle "
                             "1/2/4/8, raster 0/1/2 (a table tuned with a build that had other tiles: re-tune)")
        return TILES.index(tile) + len(TILES) * (swizzle.bit_length() - 1 + 4 * raster)
    if not isinstance(value, int) or not 0 <= value < _LEGACY_TILES * SCHEDULES:
        raise ValueError(f"CUTLASS 2:4 config must be an int in [0, {_LEGACY_TILES * SCHEDULES}) (a table's legacy "
                         f"config) or a dict from config_to_json, got {value!r}")
    return _check_config(value % _LEGACY_TILES + len(TILES) * (value // _LEGACY_TILES))


def format_of(config: int) -> int:
    """The metadata format a config's tile reads."""
    return TILE_FORMATS[_check_config(config) % len(TILES)]


def compress(weight: torch.Tensor, format: int = 0) -> CutlassWeight:
    """Compress a dense 2:4 CUDA weight ``[out, in]`` (fp16 / bf16) into metadata ``format``. The caller has
    checked the 2:4 pattern (``pack_24`` does); the compressor keeps the first two nonzeros of every group of four."""
    if format not in FORMATS:
        raise ValueError(f"CUTLASS 2:4 metadata format must be one of {FORMATS}, got {format!r}")
    check_compressible_24(weight, "CUTLASS", shape_ok, "out_features % 8 == 0 and in_features % 16 == 0")
    values, meta = torch.ops.llmprune_kernels.sparse24_cutlass_compress(weight.contiguous(), format)
    return CutlassWeight(values, meta, *weight.shape, format)


def share_values(weight: CutlassWeight, packed_values: torch.Tensor) -> CutlassWeight:
    """``weight`` reading ``packed_values`` (``pack_24``'s ``[out, in/2]`` kept values) instead of its own copy
    when the two hold the same elements in the same order, so only CUTLASS's metadata (1/8 of the values'
    bytes) is extra; otherwise ``weight`` unchanged."""
    v = weight.values
    if (v.numel() == packed_values.numel() and v.dtype == packed_values.dtype and v.device == packed_values.device
            and packed_values.is_contiguous() and torch.equal(v.view(packed_values.shape), packed_values)):
        return weight._replace(values=packed_values.view(-1))
    return weight


def linear(x: torch.Tensor, weight: CutlassWeight, out_features: int, bias: torch.Tensor | None = None,
           config: int = 0) -> torch.Tensor:
    """``x [M, in] @ W.T (+ bias)`` for a weight from :func:`compress`.

    Checked here, not only by the op: a C++ exception raised through the dispatcher can take the process
    down, so the op only sees valid input.
    """
    config = _check_config(config)
    fmt = format_of(config)
    if fmt != weight.format:
        raise ValueError(f"CUTLASS 2:4 config {config} ({describe(config)}) reads metadata format {fmt}, but the "
                         f"weight was compressed in format {weight.format}: compress(weight, format={fmt})")
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"CUTLASS 2:4 linear needs x of shape [M, {weight.in_features}], got {tuple(x.shape)}")
    if out_features != weight.out_features:
        raise ValueError(f"CUTLASS 2:4 linear: out_features={out_features} but the weight was compressed as "
                         f"{weight.out_features}x{weight.in_features}")
    if x.dtype != weight.values.dtype or x.device != weight.values.device:
        raise ValueError(f"CUTLASS 2:4 linear: x is {x.dtype} on {x.device} but the weight is "
                         f"{weight.values.dtype} on {weight.values.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"CUTLASS 2:4 linear: bias must be [{out_features}] {x.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return torch.ops.llmprune_kernels.sparse24_cutlass_linear(x, weight.values, weight.meta, out_features, bias, config)


def search(x: torch.Tensor, weights: dict[int, list[CutlassWeight]], out_features: int,
           time_fn) -> tuple[int, float, dict]:
    """Time each tile whose metadata format ``weights`` holds (format -> the weight copies) and whose cluster
    has work for all its CTAs (:func:`cluster_has_work`) with CUTLASS's default schedule, then the best tile
    with every swizzle and explicit raster order, with ``time_fn(fns)`` (cycling through the copies); return
    the fastest config."""
    times = {}

    def measure(cfg: int) -> None:
        try:
            times[cfg] = time_fn([lambda w=w, c=cfg: linear(x, w, out_features, None, c)
                                  for w in weights[format_of(cfg)]])
        except RuntimeError:  # a config that cannot run this problem does not compete
            pass

    for tile in range(len(TILES)):
        if TILE_FORMATS[tile] in weights and cluster_has_work(tile, x.shape[0]):
            measure(tile)
    if not times:
        raise RuntimeError(f"no CUTLASS 2:4 config runs {out_features}x{x.shape[1]} at M={x.shape[0]}")
    tile = min(times, key=times.get)
    for cfg in CONFIGS[len(TILES) * 4 + tile::len(TILES)]:  # explicit raster orders (the heuristic picks one)
        measure(cfg)
    best = min(times, key=times.get)
    return best, times[best], times


class CutlassBackend(Backend):
    """CUTLASS's sm90 sparse GEMM (wgmma.sp) on its own compressed weight, one per metadata format; large M."""

    name = "cutlass"
    tune_min_m = MIN_M

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and available(device)

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return shape_ok(out_features, in_features, dtype)

    def state_key(self, config) -> int:
        return format_of(config if config is not None else 0)

    def prepare(self, packed: Packed24, config=None) -> CutlassWeight:
        # values shared with the packed weight where the layouts agree: only the metadata is extra
        return share_values(compress(unpack_24(packed), self.state_key(config)), packed.values)

    def default_config(self, out_features, in_features, dtype, m):
        return 0

    def bind(self, state: CutlassWeight, config, m, in_features, out_features, bias):
        op = torch.ops.llmprune_kernels.sparse24_cutlass_linear.default
        cfg = _check_config(config)

        def run(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != state.values.dtype:  # the op's own check would raise from C++ (see ``linear``)
                raise TypeError(f"SparseLinear holds {state.values.dtype} weights, got a {x.dtype} input")
            y = op(x.reshape(m, in_features), state.values, state.meta, out_features, bias, cfg)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)
        return run

    def call(self, state, config, x, out_features, bias):
        y = linear(x.reshape(-1, x.shape[-1]), state, out_features, bias, config if config is not None else 0)
        return y.reshape(*x.shape[:-1], out_features)

    def tuning_states(self, packed):
        return {f: [compress(unpack_24(p), f) for p in packed] for f in FORMATS}

    def tune(self, states, x, out_features, time_fn):
        cfg, t, _ = search(x, states, out_features, lambda fns: time_fn(fns, trials=3))
        return cfg, t, [lambda w=w: linear(x, w, out_features, None, cfg) for w in states[format_of(cfg)]]

    def describe(self, config) -> str:
        return describe(config)

    def config_to_json(self, config):
        return config_to_json(config)

    def config_from_json(self, value):
        return config_from_json(value)

