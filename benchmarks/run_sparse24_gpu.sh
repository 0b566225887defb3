#!/usr/bin/env bash
# One GPU session for the 2:4 work: isolated build of _C (module.cpp + csrc/sparse24 only, so other
# in-progress sources cannot break it), then the steps named in MODE, in this order:
#   tests  the CUDA + CPU tests of test_pack24 / test_sparse24_matmul / test_sparse_linear (not slow)
#   bench  benchmarks/bench_sparse24.py -> $OUT/sparse24_h100.json, sparse24_tuning_h100.json
#   e2e    benchmarks/e2e_sparse24.py (graph, then eager), merged into the same JSON
#   diag   benchmarks/diag_cusparselt.py (one subprocess per check)
#   slow   the SmolLM2 perplexity test on CUDA
# Logs go to stdout; only JSON and the full test log are written under $OUT (the device tool returns
# a limited number of files).
# Usage (repo root): MODE="tests bench e2e" bash benchmarks/run_sparse24_gpu.sh > $OUT/log.txt 2>&1
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
MODE=" ${MODE:-tests bench e2e} "
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
W=/tmp/w
rm -rf $W && mkdir -p $W/csrc && cp -r llmprune_kernels setup.py pyproject.toml $W/ && rm -f $W/llmprune_kernels/_C*.so
cp csrc/module.cpp $W/csrc/ && cp -r csrc/sparse24 $W/csrc/
(cd $W && time python setup.py build_ext --inplace -q) 2>&1 | tail -4
cp -r python_tests benchmarks $W/
export PYTHONPATH=$W:/tmp/site
cd $W
python -c "import llmprune_kernels as l, torch; print(l.backends(), torch.__version__, torch.cuda.get_device_name())"
if [[ "$MODE" == *" diag "* ]]; then
  timeout 200 python benchmarks/diag_cusparselt.py
  if [ $? -ne 0 ]; then echo "cuSPARSELt path disabled (diag step A failed)"; export LLMPRUNE_NO_CUSPARSELT=1; fi
fi
if [[ "$MODE" == *" tests "* ]]; then
  timeout ${TEST_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider python_tests/test_pack24.py python_tests/test_sparse24_matmul.py python_tests/test_sparse_linear.py -m "not slow" -rfE ${TEST_K:+-k "$TEST_K"} > $OUT/tests_full.txt 2>&1
  echo "tests rc=$?"; tail -25 $OUT/tests_full.txt
fi
if [[ "$MODE" == *" bench "* ]]; then
  SPARSE24_RESULTS=$OUT/sparse24_h100.json SPARSE24_TABLE=$OUT/sparse24_tuning_h100.json timeout ${BENCH_TIMEOUT:-300} python -m pytest -q -s -p no:cacheprovider benchmarks/bench_sparse24.py ${BENCH_K:+-k "$BENCH_K"} --benchmark-json=$OUT/pytest_benchmark.json 2>&1 | grep -E "path=|passed|failed|Error|error" | tail -60
fi
if [[ "$MODE" == *" e2e "* ]]; then
  for mode in graph eager; do
    timeout ${E2E_TIMEOUT:-120} python benchmarks/e2e_sparse24.py --mode $mode --layers ${E2E_LAYERS:-8} --table $OUT/sparse24_tuning_h100.json --results $OUT/sparse24_h100.json 2>&1 | tail -32
  done
fi
if [[ "$MODE" == *" slow "* ]]; then
  timeout 150 python -m pytest -q -x -p no:cacheprovider python_tests/test_sparse_linear.py -m slow -k cuda 2>&1 | tail -15
fi
