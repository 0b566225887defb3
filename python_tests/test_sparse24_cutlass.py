"""CUTLASS sm90 2:4 GEMM (llmprune_kernels.sparse24.backends.cutlass_sm90): every tile config equals the masked dense
linear, in eager mode and CUDA graphs, at token counts that do not fill a tile; tuning measures it and
the table keeps its config; bad input is refused with a message naming it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24 import backends, dispatch, tuning
from llmprune_kernels.testing import random_24_weight

needs_cutlass = pytest.mark.skipif(not ctl.available(), reason="CUTLASS sm90 ops not built or no sm_90 GPU")
# fp32 accumulation, one rounding of the output: relative to the largest |output|
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def test_shape_rule():
    assert ctl.shape_ok(4096, 11008, torch.bfloat16) and ctl.shape_ok(8, 16, torch.float16)
    assert not ctl.shape_ok(4096, 4104, torch.float16)  # in % 16 != 0
    assert not ctl.shape_ok(4100, 4096, torch.float16)  # out % 8 != 0
    assert not ctl.shape_ok(4096, 4096, torch.float32)


def test_not_available_on_a_cpu_device():
    assert not ctl.available("cpu") and not ctl.available(torch.device("cpu"))


def test_compress_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D CUDA weight"):
        ctl.compress(torch.zeros(8, 16, dtype=torch.float16))
    w = ctl.CutlassWeight(torch.zeros(1), torch.zeros(1), 8, 16)
    n = len(ctl.CONFIGS)
    with pytest.raises(ValueError, match=rf"must be an int in \[0, {n}\), got {n}"):
        ctl.linear(torch.zeros(1, 16), w, 8, None, n)
    with pytest.raises(ValueError, match=r"shape \[M, 16\], got \(1, 32\)"):
        ctl.linear(torch.zeros(1, 32), w, 8, None, 0)
    with pytest.raises(ValueError, match="out_features=4 but the weight was compressed as 8x16"):
        ctl.linear(torch.zeros(1, 16), w, 4, None, 0)
    with pytest.raises(ValueError, match="x is torch.float16"):
        ctl.linear(torch.zeros(1, 16, dtype=torch.float16), w, 8, None, 0)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        ctl.linear(torch.zeros(1, 16), w, 8, torch.zeros(4), 0)
    k128 = ctl.TILE_FORMATS.index(1)
    with pytest.raises(ValueError, match=rf"config {k128} .* reads metadata format 1, but the weight was compressed "
                                         r"in format 0: compress\(weight, format=1\)"):
        ctl.linear(torch.zeros(1, 16), w, 8, None, k128)
    with pytest.raises(ValueError, match=r"metadata format must be one of \(0, 1\), got 2"):
        ctl.compress(torch.zeros(8, 16, dtype=torch.float16), 2)
    assert ctl.describe(len(ctl.TILES) * (2 + 4 * 2)) == "128x128x64 cluster 2x1, swizzle 4, raster along tokens"


def test_choice_json_keeps_the_cutlass_config_and_lean_choice_uses_it():
    c = dispatch.Choice("dense", {"dense": 1.0, "cutlass": 1.03}, {"cutlass": 2})
    back = dispatch.Choice.from_json(c.to_json())
    assert back.config("cutlass") == 2 and back.path == "dense"
    lean = dispatch.lean_choice(back, 0.05)
    assert lean.path == "cutlass" and lean.config() == 2
    assert dispatch.lean_choice(dispatch.Choice("dense", {"dense": 1.0, "cutlass": 1.03}), 0.05).path == "dense"
    with pytest.raises(ValueError, match="must be an int"):
        dispatch.Choice.from_json({**c.to_json(), "configs": {"cutlass": 99}})
    with pytest.raises(ValueError, match="is unknown: tile must be one of"):
        dispatch.Choice.from_json({**c.to_json(), "configs": {"cutlass": {"tile": "512x512x64", "swizzle": 1, "raster": 0}}})


@pytest.mark.parametrize("config", [0, 3, 6, 7, 20, 83])
def test_tables_of_the_seven_tile_build_keep_their_meaning(config):
    """A bare int in a table was encoded as tile + 7 * schedule; it must name the same tile and schedule now."""
    legacy_tiles = ("128x128x64 cluster 2x1", "128x256x64 cluster 1x2", "256x128x64 cluster 2x1",
                    "256x128x64 cluster 2x1 stream-K", "256x128x64 cluster 1x2",
                    "128x128x64 cluster 2x1 ping-pong", "64x256x64 cluster 1x2 ping-pong")
    sched = config // 7
    want = (f"{legacy_tiles[config % 7]}, swizzle {1 << (sched % 4)}, raster "
            f"{('heuristic', 'along rows', 'along tokens')[sched // 4]}")
    new = dispatch.Choice.from_json({"path": "cutlass", "cutlass": config}).config()  # a table with one key per backend
    assert ctl.describe(new) == want


@pytest.mark.parametrize("config", [0, 8, 9 * 5 + 7, len(ctl.CONFIGS) - 1])
def test_config_json_names_the_tile(config):
    saved = ctl.config_to_json(config)
    assert saved["tile"] == ctl.TILES[config % len(ctl.TILES)]
    assert ctl.config_from_json(saved) == config


@pytest.mark.cuda
@needs_cutlass
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", range(len(ctl.TILES)))
@pytest.mark.parametrize("out_f, in_f, m", [(512, 1024, 1), (384, 1040, 77), (1024, 512, 300), (256, 2048, 2048)])
def test_matches_masked_dense(dtype, config, out_f, in_f, m):
    w = random_24_weight(out_f, in_f, dtype, "cuda")
    x = torch.randn(m, in_f, device="cuda", dtype=dtype)
    bias = torch.randn(out_f, device="cuda", dtype=dtype)
    cw = ctl.compress(w, ctl.format_of(config))
    ref = F.linear(x.float(), w.float())
    y = ctl.linear(x, cw, out_f, None, config)
    assert y.shape == (m, out_f) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    yb = ctl.linear(x, cw, out_f, bias, config)
    assert rel_err(yb, ref + bias.float()) <= TOL[dtype]


@pytest.mark.cuda
@needs_cutlass
def test_cuda_graph_and_misaligned_input_give_the_same_bits():
    w = random_24_weight(512, 1024, torch.bfloat16, "cuda")
    cw = ctl.compress(w)
    buf = torch.randn(2048 * 1024 + 4, device="cuda", dtype=torch.bfloat16)
    x = buf[:2048 * 1024].view(2048, 1024)
    eager = ctl.linear(x, cw, 512, None, 1)
    shifted = buf[4:].view(2048, 1024)  # base 8 bytes off 16-byte alignment: copied before TMA reads it
    shifted_ref = ctl.linear(shifted.clone(), cw, 512, None, 1)
    assert torch.equal(ctl.linear(shifted, cw, 512, None, 1), shifted_ref)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ctl.linear(x, cw, 512, None, 1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = ctl.linear(x, cw, 512, None, 1)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


@pytest.mark.cuda
@needs_cutlass
def test_linear_rejects_a_weight_compressed_for_another_shape_or_dtype():
    cw = ctl.compress(random_24_weight(512, 1024, torch.float16, "cuda"))
    assert (cw.out_features, cw.in_features) == (512, 1024)
    with pytest.raises(ValueError, match="compressed as 512x1024"):
        ctl.linear(torch.randn(4, 1024, device="cuda", dtype=torch.float16), cw, 256, None, 0)
    with pytest.raises(ValueError, match="x is torch.bfloat16"):
        ctl.linear(torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16), cw, 512, None, 0)


@pytest.mark.cuda
@needs_cutlass
def test_every_schedule_gives_the_same_bits():
    """Swizzle and raster order only reorder which tiles run when: each tile's sums are unchanged."""
    w = random_24_weight(1024, 512, torch.bfloat16, "cuda")
    cws = {f: ctl.compress(w, f) for f in ctl.FORMATS}
    x = torch.randn(600, 512, device="cuda", dtype=torch.bfloat16)
    for tile in range(len(ctl.TILES)):
        cw = cws[ctl.TILE_FORMATS[tile]]
        want = ctl.linear(x, cw, 1024, None, tile)
        for cfg in ctl.CONFIGS[tile::len(ctl.TILES)]:
            assert torch.equal(ctl.linear(x, cw, 1024, None, cfg), want), ctl.describe(cfg)


@pytest.mark.cuda
@needs_cutlass
def test_tuning_measures_cutlass_and_keeps_its_config():
    choices = tuning.tune_shape(512, 1024, torch.bfloat16, "cuda", buckets=(16, 2048), reps=3)
    assert "cutlass" not in choices[16].times_ms  # below ctl.MIN_M
    c = choices[2048]
    assert c.config("cutlass") in ctl.CONFIGS and "cutlass" in c.times_ms
    assert c.path == dispatch.choose_path(c.times_ms)


@pytest.mark.cuda
@needs_cutlass
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_linear_shares_the_packed_values_when_they_match(dtype):
    """SparseLinear's CUTLASS weight reads the module's packed values when CUTLASS's compressed values equal
    them (then only the metadata is extra), and the output is the masked dense linear either way."""
    from llmprune_kernels.sparse24 import SparseLinear
    from llmprune_kernels.sparse24.pack import pack_24

    w = random_24_weight(1024, 2048, dtype, "cuda")
    cw = ctl.compress(w)
    packed = pack_24(w)
    same = cw.values.numel() == packed.values.numel() and torch.equal(cw.values.view_as(packed.values), packed.values)
    lin = torch.nn.Linear(2048, 1024, bias=False, device="cuda", dtype=dtype)
    lin.weight.data = w
    sl = SparseLinear.from_linear(lin)
    sl.force_path = "cutlass"
    sl.prepare()
    assert (sl.layout("cutlass").values.data_ptr() == sl.values.data_ptr()) == same
    print(f"CUTLASS values equal pack_24 values: {same}")
    x = torch.randn(2048, 2048, device="cuda", dtype=dtype)
    assert rel_err(sl(x), F.linear(x.float(), w.float())) <= TOL[dtype]


def test_tile_formats_follow_the_k_step():
    """Tiles with a 128-deep K step read metadata format 1, all others format 0 (CUTLASS's metadata atom)."""
    assert len(ctl.TILE_FORMATS) == len(ctl.TILES) and set(ctl.TILE_FORMATS) == set(ctl.FORMATS)
    for tile, name in enumerate(ctl.TILES):
        assert ctl.TILE_FORMATS[tile] == (name.split()[0].split("x")[2] == "128")
        assert ctl.format_of(tile + len(ctl.TILES) * 5) == ctl.TILE_FORMATS[tile]


def test_table_names_the_formats_its_cutlass_configs_read():
    table = dispatch.TuningTable()
    cutlass = backends.get("cutlass")
    assert {cutlass.state_key(c) for c in table.configs_for("cutlass", 256, 512, torch.bfloat16)} == {0}
    k128 = ctl.TILE_FORMATS.index(1)
    table.entries[dispatch.shape_key(256, 512, torch.bfloat16)] = {
        64: dispatch.Choice("cutlass", configs={"cutlass": 0}), 2048: dispatch.Choice("cutlass", configs={"cutlass": k128}),
        8192: dispatch.Choice("dense")}
    assert {cutlass.state_key(c) for c in table.configs_for("cutlass", 256, 512, torch.bfloat16)} == {0, 1}


@pytest.mark.cuda
@needs_cutlass
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_formats_hold_the_same_values_and_differ_only_in_metadata(dtype):
    w = random_24_weight(512, 1024, dtype, "cuda")
    a, b = ctl.compress(w, 0), ctl.compress(w, 1)
    assert (a.format, b.format) == (0, 1) and torch.equal(a.values, b.values)
    x = torch.randn(300, 1024, device="cuda", dtype=dtype)
    ref = F.linear(x.float(), w.float())
    for cfg, cw in ((0, a), (ctl.TILE_FORMATS.index(1), b)):
        assert rel_err(ctl.linear(x, cw, 512, None, cfg), ref) <= TOL[dtype]


def test_search_skips_tiles_whose_cluster_would_idle():
    """At M = 64 a 1x2 cluster of 128-token tiles has one idle CTA per pair; from 2 token tiles on it has work."""
    one_by_two = [t for t, name in enumerate(ctl.TILES)  # 128 tokens per tile, 2 CTAs along tokens
                  if name.split()[0].split("x")[1] == "128" and "cluster 1x2" in name]
    assert one_by_two and ctl.TILES.index("256x128x128 cluster 1x2") in one_by_two
    for t in one_by_two:
        assert not ctl.cluster_has_work(t, 64) and not ctl.cluster_has_work(t, 128)
        assert ctl.cluster_has_work(t, 129) and ctl.cluster_has_work(t, 2048)
    for t, name in enumerate(ctl.TILES):
        if "cluster 2x1" in name:
            assert ctl.cluster_has_work(t, 1)
    assert not ctl.cluster_has_work(ctl.TILES.index("64x256x64 cluster 1x2 ping-pong"), 256)
    assert ctl.cluster_has_work(ctl.TILES.index("64x256x64 cluster 1x2 ping-pong"), 257)
