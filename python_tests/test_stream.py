"""Streamed pruning from a safetensors directory, resumable runs, activation placement and the stage table.

Tiny random LLaMA models saved with ``save_pretrained`` (sharded, so the index is exercised) are pruned both
ways: ``prune_model`` on the loaded model and ``prune_pretrained`` from disk; the results must be equal bit for
bit and the streamed output must load with plain ``transformers``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_config, tiny_model, tiny_tokenizer

from llmprune_kernels import SparsityConfig, prune_model, prune_pretrained
from llmprune_kernels.pipeline import memory
from llmprune_kernels.pipeline.progress import STAGES
from llmprune_kernels.pipeline.report import build_report
from llmprune_kernels.pipeline.resume import Checkpoint, remove_work_dir, work_dir_for
from llmprune_kernels.pipeline.stream import INDEX


def _save(model, folder: Path, shard: str = "60KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _four_layers(tie: bool = False):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 4
    config.tie_word_embeddings = tie
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _save(tiny_model("llama"), tmp_path_factory.mktemp("src") / "tiny")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_run_equals_in_memory_run(source, tmp_path, method):
    ids = random_ids(5, 16)
    assert len(set(json.loads((source / INDEX).read_text())["weight_map"].values())) > 2  # sharded source
    ref = _load(source)
    expect = prune_model(ref, ids, method, SparsityConfig(0.5), batch_size=2, progress=False)
    out = tmp_path / "pruned"
    got = prune_pretrained(source, out, ids, method, SparsityConfig(0.5), batch_size=2, progress=False,
                           extra_json=lambda r: {"pruning_report.json": {"sparsity": r.overall_sparsity}})
    assert [(s.name, s.sparsity, s.rel_error) for s in got.linears] == \
        [(s.name, s.sparsity, s.rel_error) for s in expect.linears]
    loaded = _load(out)
    _assert_same_weights(loaded, ref)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(loaded.state_dict()) and index["metadata"]["total_size"] > 0
    assert all((out / f).is_file() for f in index["weight_map"].values())
    assert len(set(index["weight_map"].values())) == 3  # one shard per decoder layer, one for the rest
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "pruning_report.json").read_text()) == {"sparsity": got.overall_sparsity}
    assert not work_dir_for(out).exists() and [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_tied_embeddings_and_dtype(tmp_path):
    src = _save(_four_layers(tie=True), tmp_path / "tied")
    assert "lm_head.weight" not in json.loads((src / INDEX).read_text())["weight_map"]
    ids = random_ids(3, 12)
    from llmprune_kernels.pipeline.models import load_model

    ref, _ = load_model(src, dtype=torch.bfloat16)
    prune_model(ref, ids, "wanda", SparsityConfig(n=2, m=4), progress=False)
    prune_pretrained(src, tmp_path / "out", ids, "wanda", SparsityConfig(n=2, m=4), dtype=torch.bfloat16,
                     progress=False)
    loaded = _load(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same_weights(loaded, ref)


def test_magnitude_streams_without_calibration(source, tmp_path):
    ref = _load(source)
    prune_model(ref, None, "magnitude", SparsityConfig(0.6), progress=False)
    result = prune_pretrained(source, tmp_path / "out", None, "magnitude", SparsityConfig(0.6), progress=False)
    assert all(s.rel_error is None for s in result.linears)
    _assert_same_weights(_load(tmp_path / "out"), ref)


def _interrupt_after(monkeypatch, layer: int):
    """Make the run fail right after decoder layer ``layer`` is checkpointed, as if killed there."""
    original = Checkpoint.save_layer

    def save_layer(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == layer:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save_layer", save_layer)


def test_interrupted_runs_resume_to_the_same_result(tmp_path, monkeypatch):
    src = _save(_four_layers(), tmp_path / "src")
    ids = random_ids(4, 12)
    cfg = SparsityConfig(0.5)
    whole = prune_pretrained(src, tmp_path / "whole", ids, "sparsegpt", cfg, progress=False)
    # Streamed: interrupted after layer 1, then resumed.
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            prune_pretrained(src, tmp_path / "out", ids, "sparsegpt", cfg, progress=False)
    work = work_dir_for(tmp_path / "out")
    assert json.loads((work / "manifest.json").read_text())["completed_layers"] == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match="pass resume=True"):
        prune_pretrained(src, tmp_path / "out", ids, "sparsegpt", cfg, progress=False)
    with pytest.raises(ValueError, match=r"its run has sparsity=\['0.5'.*this one sparsity=\['0.6'"):
        prune_pretrained(src, tmp_path / "out", ids, "sparsegpt", SparsityConfig(0.6), resume=True, progress=False)
    with pytest.raises(ValueError, match="calibration_sha256"):
        prune_pretrained(src, tmp_path / "out", random_ids(4, 12, seed=5), "sparsegpt", cfg, resume=True,
                         progress=False)
    resumed = prune_pretrained(src, tmp_path / "out", ids, "sparsegpt", cfg, resume=True, progress=False)
    _assert_same_weights(_load(tmp_path / "out"), _load(tmp_path / "whole"))
    assert [(s.name, s.rel_error) for s in resumed.linears] == [(s.name, s.rel_error) for s in whole.linears]
    assert len(resumed.layer_times_s) == 4 and not work.exists()
    # In memory: the completed layers come back from the work directory.
    ref = _load(src)
    prune_model(ref, ids, "sparsegpt", cfg, progress=False)
    model = _load(src)
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            prune_model(model, ids, "sparsegpt", cfg, output_dir=tmp_path / "mem", progress=False)
    model = _load(src)
    result = prune_model(model, ids, "sparsegpt", cfg, output_dir=tmp_path / "mem", resume=True, progress=False)
    _assert_same_weights(model, ref)
    assert len(result.linears) == 4 * 7
    remove_work_dir(tmp_path / "mem")
    assert not work_dir_for(tmp_path / "mem").exists()


def test_failed_background_write_is_raised_and_resumes(tmp_path, monkeypatch):
    """A layer shard's write fails in the background thread: the run raises it, no output appears, the
    manifest names only the layers on disk, and a resumed run gives the uninterrupted result."""
    from llmprune_kernels.pipeline import resume

    src = _save(_four_layers(), tmp_path / "src")
    ids, cfg = random_ids(4, 12), SparsityConfig(0.5)
    original = resume.save_tensors

    def failing(tensors, path):
        if "00003-of" in path.name:
            raise OSError(28, "No space left on device")
        original(tensors, path)

    with monkeypatch.context() as m:
        m.setattr(resume, "save_tensors", failing)
        with pytest.raises(OSError, match="No space left"):
            prune_pretrained(src, tmp_path / "out", ids, "wanda", cfg, progress=False)
    assert not (tmp_path / "out").exists()
    work = work_dir_for(tmp_path / "out")
    assert json.loads((work / "manifest.json").read_text())["completed_layers"] == 2
    assert not (work / "model-00003-of-00005.safetensors").exists()
    prune_pretrained(src, tmp_path / "out", ids, "wanda", cfg, resume=True, progress=False)
    ref = _load(src)
    prune_model(ref, ids, "wanda", cfg, progress=False)
    _assert_same_weights(_load(tmp_path / "out"), ref)


def test_resume_needs_an_output_directory():
    with pytest.raises(ValueError, match=r"resume=True needs an output directory"):
        prune_model(tiny_model("llama"), random_ids(2, 8), "wanda", resume=True, progress=False)


def test_bad_sources_and_outputs_fail_before_any_work(source, tmp_path):
    ids = random_ids(2, 8)
    with pytest.raises(ValueError, match="not a model directory with a config.json"):
        prune_pretrained(tmp_path / "nope", tmp_path / "out", ids, progress=False)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor"):
        prune_pretrained(tmp_path / "bare", tmp_path / "out", ids, progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        prune_pretrained(source, tmp_path / "taken", ids, progress=False)
    with pytest.raises(ValueError, match="gpu_memory 0 is invalid"):
        prune_pretrained(source, tmp_path / "out", ids, gpu_memory=0, progress=False)
    with pytest.raises(ValueError, match="needs the whole model's weights"):
        prune_pretrained(source, tmp_path / "out", ids, "gblm", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bare", "taken"]


def test_activation_budget_and_host_copies(source, tmp_path):
    """A budget too small for the activations moves them to host memory; the result does not change."""
    ids = random_ids(4, 12)
    prune_pretrained(source, tmp_path / "a", ids, "wanda", progress=False)
    prune_pretrained(source, tmp_path / "b", ids, "wanda", gpu_memory=1, progress=False)
    _assert_same_weights(_load(tmp_path / "a"), _load(tmp_path / "b"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory.offload_needed(cuda, 10, 11) and not memory.offload_needed(cuda, 11, 11)
    assert not memory.offload_needed(cuda, None, 10**15) and not memory.offload_needed(cpu, 1, 10**15)
    # The plan for a CUDA run (no GPU needed to plan): the budget below the walk's need offloads, above it not.
    from llmprune_kernels.pipeline.plan import plan_offload

    model = tiny_model("llama")
    assert plan_offload(model, ids, cuda, 2, 1) and plan_offload(model, ids, cuda, 2, 10**5)
    assert not plan_offload(model, ids, cuda, 2, 10**9) and not plan_offload(model, ids, cuda, 2, None)
    assert not plan_offload(model, ids, cpu, 2, 1) and not plan_offload(model, None, cuda, 2, 1)
    result = prune_model(tiny_model("llama"), ids, "wanda", progress=False, offload_activations=True)
    assert result.activations_offloaded and not prune_model(tiny_model("llama"), ids, "wanda",
                                                            progress=False).activations_offloaded
    t = torch.randn(3, 4)
    assert memory.to_host(t) is t
    batches = [torch.randn(2, 3) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(memory.device_batches(batches, cpu), batches))
    assert memory.parse_bytes("20GB") == 20 * 10**9 and memory.parse_bytes("1.5GiB") == 3 * 2**29
    with pytest.raises(ValueError, match=r"memory size '20 parsecs' is invalid; allowed: .*GB"):
        memory.parse_bytes("20 parsecs")


def test_host_buffer_pool_only_with_cuda():
    with memory.host_buffers() as pool:
        t = torch.randn(3, 4)
        assert memory.to_host(t) is t  # a CPU tensor is never copied
        assert (pool is None) == (not torch.cuda.is_available())
    with memory.host_buffers(enabled=False) as pool:
        assert pool is None


@pytest.mark.cuda
def test_offloaded_activations_use_exact_size_registered_buffers(tmp_path):
    """Host copies inside ``host_buffers`` are page-locked buffers of the exact size, reused once freed and
    unregistered when the pool closes; an offloaded CUDA run equals one with the activations on the GPU."""
    import gc

    t = torch.randn(5, 7, 3, device="cuda", dtype=torch.float16)
    with memory.host_buffers() as pool:
        h = memory.to_host(t, non_blocking=True)
        torch.cuda.synchronize()
        assert h.is_pinned() and torch.equal(h, t.cpu()) and pool.registered_bytes == t.numel() * 2
        ptr = h.data_ptr()
        del h
        gc.collect()
        h2 = memory.to_host(t)
        assert h2.data_ptr() == ptr and pool.registered_bytes == t.numel() * 2  # the freed buffer, reused
        assert torch.equal(h2.to("cuda", non_blocking=True), t)
    del h2
    gc.collect()
    assert pool.registered_bytes == 0
    ids = random_ids(6, 12)
    models = []
    for m in ("wanda", "sparsegpt"):
        model = tiny_model("llama")
        res = prune_model(model, ids, m, device="cuda", progress=False, offload_activations=True, batch_size=2)
        assert res.activations_offloaded
        models.append(model)
    base = [tiny_model("llama") for _ in range(2)]
    for b, m in zip(base, ("wanda", "sparsegpt")):
        prune_model(b, ids, m, device="cuda", progress=False, batch_size=2)
    for a, b in zip(models, base):
        for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), n


def test_stage_table_in_result_and_report(source, tmp_path):
    result = prune_pretrained(source, tmp_path / "out", random_ids(4, 12), "wanda", progress=False)
    assert tuple(result.stage_times_s) == STAGES
    assert all(v >= 0 for v in result.stage_times_s.values())
    for stage in ("load", "capture", "statistics", "solve", "recompute", "write"):
        assert result.stage_times_s[stage] > 0, stage
    assert sum(result.stage_times_s.values()) <= result.total_time_s
    in_memory = prune_model(tiny_model("llama"), random_ids(4, 12), "wanda", progress=False)
    assert tuple(in_memory.stage_times_s) == STAGES and in_memory.stage_times_s["write"] == 0.0
    assert sum(in_memory.stage_times_s.values()) <= in_memory.total_time_s
    report = build_report(model="tiny", method="wanda", prune_result=result)
    assert report["stage_times_s"] == result.stage_times_s


_CHILD = textwrap.dedent("""
    import json, os, re, signal, sys
    import torch
    from llmprune_kernels import SparsityConfig, prune_pretrained
    from llmprune_kernels.pipeline import resume
    from llmprune_kernels.pipeline.memory import rss_bytes

    args = json.loads(sys.argv[1])
    ids = torch.load(args["ids"])
    if args.get("kill_after") is not None:
        original = resume.Checkpoint.save_layer

        def save_layer(self, index, *a, **k):
            original(self, index, *a, **k)
            if index == args["kill_after"]:
                if args.get("written"):  # the layer's shard and manifest are on disk; else killed mid-write
                    self.wait()
                os.kill(os.getpid(), signal.SIGKILL)

        resume.Checkpoint.save_layer = save_layer
    if args.get("warmup"):  # imports, allocator and kernels warm: the measurement sees the run only
        prune_pretrained(args["warmup"], args["out"] + "-warmup", ids, "wanda", progress=False)
    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) from here on, not the warm-up's
        f.write("5")
    prune_pretrained(args["src"], args["out"], ids, "wanda", SparsityConfig(0.5), progress=False)
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)) * 1024
    print(json.dumps({"before": before, "peak": peak}))
""")


def _child(tmp_path, **args):
    ids_path = tmp_path / "ids.pt"
    torch.save(random_ids(4, 32), ids_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, json.dumps({"ids": str(ids_path), **args})],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("written", [True, False], ids=["after-write", "during-write"])
def test_sigkilled_run_resumes_to_the_same_result(tmp_path, written):
    """Killed once layer 1's shard is on disk, or while it is being written in the background (then layer 1
    is either complete or not named by the manifest, never half there)."""
    src = _save(_four_layers(), tmp_path / "src")
    proc = _child(tmp_path, src=str(src), out=str(tmp_path / "out"), kill_after=1, written=written)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    work = work_dir_for(tmp_path / "out")
    completed = json.loads((work / "manifest.json").read_text())["completed_layers"]
    assert completed == 2 if written else completed in (1, 2)
    ids = torch.load(tmp_path / "ids.pt")
    prune_pretrained(src, tmp_path / "out", ids, "wanda", SparsityConfig(0.5), resume=True, progress=False)
    ref = _load(src)
    prune_model(ref, ids, "wanda", SparsityConfig(0.5), progress=False)
    _assert_same_weights(_load(tmp_path / "out"), ref)


def test_streamed_run_holds_a_few_layers_in_cpu_memory(tmp_path):
    """24 layers of 15.7 MB (fp32, hidden 512, intermediate 2048): peak RSS growth stays within 6 layers.

    What a layer step holds: the layer read from the source, the dense snapshot for the reconstruction
    error, the pruned shard's serialised bytes, the source file's mapped pages, and allocator slack."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 2048, 24
    torch.manual_seed(0)
    with torch.no_grad():
        wide = AutoModelForCausalLM.from_config(config)
    layer_bytes = sum(p.numel() * 4 for p in wide.model.layers[0].parameters())
    model_bytes = sum(p.numel() * 4 for p in wide.parameters())
    rest_bytes = model_bytes - 24 * layer_bytes
    _save(wide, tmp_path / "wide", shard="40MB")
    del wide
    small = _save(tiny_model("llama"), tmp_path / "small")
    proc = _child(tmp_path, src=str(tmp_path / "wide"), out=str(tmp_path / "out"), warmup=str(small))
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    activations = 4 * 32 * 512 * 4
    bound = rest_bytes + 6 * layer_bytes + 4 * activations + 48 * 2**20  # 48 MiB: imports and buffers
    assert bound < model_bytes / 2  # the bound means something: far below the whole model
    growth = mem["peak"] - mem["before"]
    assert growth < bound, (growth / 2**20, bound / 2**20, model_bytes / 2**20)
    assert _load(tmp_path / "out").model.layers[23].mlp.up_proj.weight.eq(0).float().mean() == 0.5
