#!/usr/bin/env bash
# One GPU session for the 2:4 work: isolated build of _C (module.cpp + csrc/sparse24 only, so other
# in-progress sources cannot break it), then the steps named in MODE, in this order:
#   (always before tests / bench unless SKIP_PREFLIGHT=<kinds, e.g. 4,2,0>) preflight: benchmarks/preflight_sparse24.py, one process per decode
#          kernel kind; only kinds that pass are tuned ($LLMPRUNE_SPARSE24_KINDS). It also fills Triton's
#          kernel cache, so the tests and the benchmark compile little.
#   probe  .whl/cutlass_sm90_probe (benchmarks/build_cutlass_probe.sh, built off the GPU machine), first
#   tests  the CUDA + CPU tests of test_pack24 / test_sparse24_matmul / test_sparse24_mmasp /
#          test_sparse24_cutlass / test_sparse_linear ($TEST_FILES overrides the list)
#   bench  benchmarks/bench_sparse24.py -> $OUT/sparse24_h100.json, sparse24_tuning_h100.json
#   e2e    benchmarks/e2e_sparse24.py (graph, then eager), merged into the same JSON
#   diag   benchmarks/diag_cusparselt.py (one subprocess per check)
#   cutlassdiag  benchmarks/diag_cutlass_small_m.py ($CUTLASS_DIAG_ARGS)
#   hostdiag  benchmarks/diag_cutlass_host.py (host time per eager call of each op)
#   slow   the SmolLM2 perplexity test on CUDA
# Each step's time limit is its default, cut so the whole run ends within TOTAL seconds (default 540,
# counted from the start of this script) with E2E_RESERVE seconds kept for e2e; a step cut short keeps
# what it wrote (the benchmark writes its JSON after every case).
# Logs go to stdout; only JSON and the full test log are written under $OUT (the device tool returns
# a limited number of files).
# REUSE_BUILD=1: on a machine still warm from an earlier call that built the same C++ (same csrc/ and setup.py bytes),
# skip the build.
# Usage (repo root): MODE="tests bench e2e" bash benchmarks/run_sparse24_gpu.sh > $OUT/log.txt 2>&1
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
MODE=" ${MODE:-tests bench e2e} "
TOTAL=${TOTAL:-540}
# limit DEFAULT [RESERVE]: DEFAULT, but no more than what is left before TOTAL minus RESERVE (min 10 s).
limit() { local left=$((TOTAL - SECONDS - ${2:-0})); (( left < 10 )) && left=10; (( $1 < left )) && echo $1 || echo $left; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
# CUTLASS headers come from the nvidia-cutlass wheel carried in .whl/
[ -d /tmp/site/cutlass_library/source/include ] && export LLMPRUNE_CUTLASS_DIR=/tmp/site/cutlass_library/source/include
if [[ "$MODE" == *" probe "* && -x .whl/cutlass_sm90_probe ]]; then
  timeout 120 .whl/cutlass_sm90_probe > $OUT/cutlass_probe.jsonl 2>&1; echo "probe rc=$? at ${SECONDS}s"; cat $OUT/cutlass_probe.jsonl | tail -40
fi
W=/tmp/w
if [[ -n "$REUSE_BUILD" && -f /tmp/w_built_from && "$(cat /tmp/w_built_from)" == "$(find csrc setup.py -type f | sort | xargs md5sum | md5sum)" ]]; then
  # a warm machine that built this very C++ in an earlier call: keep its _C, refresh the Python
  so=$(ls $W/llmprune_kernels/_C*.so) && cp $so /tmp/_C_keep.so && rm -rf $W/llmprune_kernels && cp -r llmprune_kernels $W/ \
    && cp /tmp/_C_keep.so $W/llmprune_kernels/ && echo "build reused ($so)"
else
  rm -rf $W && mkdir -p $W/csrc && cp -r llmprune_kernels setup.py pyproject.toml $W/ && rm -f $W/llmprune_kernels/_C*.so
  cp csrc/module.cpp $W/csrc/ && cp -r csrc/sparse24 $W/csrc/
  (cd $W && time python setup.py build_ext --inplace -q) > /tmp/build.log 2>&1 || {
    echo "build failed; retrying without CUTLASS"; grep -E "error|Error" /tmp/build.log | head -20
    (cd $W && LLMPRUNE_SKIP_CUTLASS=1 python setup.py build_ext --inplace -q) 2>&1 | tail -4; }
  grep -E "llmprune_kernels:|real" /tmp/build.log | head
  find csrc setup.py -type f | sort | xargs md5sum | md5sum > /tmp/w_built_from
fi
rm -rf $W/python_tests $W/benchmarks && cp -r python_tests benchmarks $W/
export PYTHONPATH=$W:/tmp/site
cd $W
python -c "import llmprune_kernels as l, torch, triton; print(l.backends(), torch.__version__, triton.__version__, torch.cuda.get_device_name())"
echo "setup done at ${SECONDS}s"
E2E_RESERVE=0
[[ "$MODE" == *" e2e "* ]] && E2E_RESERVE=${E2E_RESERVE_S:-150}
if [[ "$MODE" == *" diag "* ]]; then
  timeout $(limit 200 $E2E_RESERVE) python benchmarks/diag_cusparselt.py
  if [ $? -ne 0 ]; then echo "cuSPARSELt path disabled (diag step A failed)"; export LLMPRUNE_NO_CUSPARSELT=1; fi
fi
if [[ -n "$SKIP_PREFLIGHT" ]]; then
  export LLMPRUNE_SPARSE24_KINDS=${SKIP_PREFLIGHT}; echo "preflight skipped: decode kinds $LLMPRUNE_SPARSE24_KINDS"
elif [[ "$MODE" == *" tests "* || "$MODE" == *" bench "* ]]; then
  good=""
  for kind in ${PREFLIGHT_KINDS:-4 2 0}; do  # dot-swap, stream-select, dot (stream-expand is not a tuning candidate)
    timeout $(limit 90 $((E2E_RESERVE + 200))) python benchmarks/preflight_sparse24.py $kind && good="$good${good:+,}$kind"
  done
  export LLMPRUNE_SPARSE24_KINDS=${good:-0}
  echo "decode kernel kinds tuned: $LLMPRUNE_SPARSE24_KINDS (preflight done at ${SECONDS}s)"
fi
if [[ "$MODE" == *" tests "* ]]; then
  # The full-size candidate tests compile every decode kernel once; the benchmark reuses them from
  # Triton's cache (same specialisations: no bias).
  timeout $(limit ${TEST_TIMEOUT:-150} $((E2E_RESERVE + 150))) python -m pytest -q -p no:cacheprovider ${TEST_FILES:-python_tests/test_pack24.py python_tests/test_sparse24_matmul.py python_tests/test_sparse24_mmasp.py python_tests/test_sparse24_cutlass.py python_tests/test_sparse_linear.py} -m "not slow" -rfE --durations=15 ${TEST_K:+-k "$TEST_K"} > $OUT/tests_full.txt 2>&1
  echo "tests rc=$? at ${SECONDS}s"; tail -40 $OUT/tests_full.txt
fi
if [[ "$MODE" == *" bench "* ]]; then
  SPARSE24_RESULTS=$OUT/sparse24_h100.json SPARSE24_TABLE=$OUT/sparse24_tuning_h100.json timeout $(limit ${BENCH_TIMEOUT:-320} $E2E_RESERVE) python -m pytest -q -s -p no:cacheprovider benchmarks/bench_sparse24.py ${BENCH_K:+-k "$BENCH_K"} --benchmark-json=$OUT/pytest_benchmark.json 2>&1 | grep -E "path=|passed|failed|Error|error" | tail -60
  echo "bench done at ${SECONDS}s"
fi
if [[ "$MODE" == *" cutlassdiag "* ]]; then
  timeout $(limit 150 $E2E_RESERVE) python benchmarks/diag_cutlass_small_m.py ${CUTLASS_DIAG_ARGS}
  echo "cutlass diag done at ${SECONDS}s"
fi
if [[ "$MODE" == *" hostdiag "* ]]; then
  timeout $(limit 120 $E2E_RESERVE) python benchmarks/diag_cutlass_host.py
  echo "host diag done at ${SECONDS}s"
fi
if [[ "$MODE" == *" e2e "* ]]; then
  half=$(( (TOTAL - SECONDS) / 2 ))
  timeout $(limit ${E2E_TIMEOUT:-120} $half) python benchmarks/e2e_sparse24.py --mode graph --layers ${E2E_LAYERS:-8} --table $OUT/sparse24_tuning_h100.json --results $OUT/sparse24_h100.json 2>&1 | tail -20
  timeout $(limit ${E2E_TIMEOUT:-120}) python benchmarks/e2e_sparse24.py --mode eager --layers ${E2E_LAYERS:-8} --table $OUT/sparse24_tuning_h100.json --results $OUT/sparse24_h100.json 2>&1 | tail -32
  echo "e2e done at ${SECONDS}s"
fi
if [[ "$MODE" == *" slow "* ]]; then
  timeout $(limit 150) python -m pytest -q -x -p no:cacheprovider python_tests/test_sparse_linear.py -m slow -k cuda 2>&1 | tail -15
fi
