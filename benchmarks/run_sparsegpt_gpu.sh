#!/usr/bin/env bash
# One GPU session for SparseGPT: CUDA build of _C in a private copy of the tree (/tmp/wsg), the tests (CPU and CUDA), the slow SmolLM2 test on CUDA, then the
# benchmarks. Writes everything to $OUT.  Usage (repo root): MODE="tests slow bench" bash benchmarks/run_sparsegpt_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
MODE=" ${MODE:-tests slow bench} "
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
W=/tmp/wsg
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
if [[ "$MODE" == *" tests "* ]]; then
  timeout ${TEST_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider python_tests/test_sparsegpt.py -m "not slow" --durations=5 2>&1 | tail -30 | tee $OUT/tests.txt
fi
if [[ "$MODE" == *" slow "* ]]; then
  timeout ${SLOW_TIMEOUT:-120} python -m pytest -q -p no:cacheprovider python_tests/test_sparsegpt.py -m slow -k cuda 2>&1 | tail -15 | tee $OUT/slow.txt
fi
if [[ "$MODE" == *" bench "* ]]; then
  LLMPRUNE_BENCH_OUT=$OUT/sparsegpt_h100.json timeout ${BENCH_TIMEOUT:-200} python -m pytest -q -s -p no:cacheprovider \
    benchmarks/bench_sparsegpt.py --benchmark-json=$OUT/pytest_benchmark.json 2>&1 | grep -v "^$" | tail -40 | tee $OUT/bench.txt
fi
