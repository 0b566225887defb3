#!/usr/bin/env bash
# One GPU call for the mma.sp 2:4 decode kernel (csrc/sparse24/sparse24_mmasp.cu):
#   1. isolated CUDA build of _C from csrc/module.cpp + csrc/sparse24 only (other in-progress sources cannot
#      break it), reused while those sources are unchanged and the machine is warm;
#   2. benchmarks/diag_mmasp.py: one hardware mma.sp vs the CPU emulator (and, on a mismatch, which metadata
#      / register transform would fix the layout), one known 16x32 tile, every launch config on 48x600;
#   3. python_tests/test_sparse24_mmasp.py (CPU + CUDA tests; failures printed in full);
#   4. benchmarks/bench_sparse24_mmasp.py -> $OUT/sparse24_mmasp_h100.json (whatever time is left).
# Everything ends within TOTAL seconds (default 400) counted from the start of this script.
# Usage (repo root, device machine): bash benchmarks/run_mmasp_gpu.sh 2>&1 | tail -150
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
TOTAL=${TOTAL:-400}
left() { local l=$((TOTAL - SECONDS - ${1:-0})); (( l < 10 )) && l=10; echo $l; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
W=/tmp/wmmasp
SRC_SUM=$(cat csrc/module.cpp csrc/sparse24/* setup.py | md5sum | cut -d' ' -f1)
if [ -f $W/.built ] && [ "$(cat $W/.built)" = "$SRC_SUM" ] && ls $W/llmprune_kernels/_C*.so >/dev/null 2>&1; then
  echo "reusing the CUDA build in $W"
  so=$(ls $W/llmprune_kernels/_C*.so); cp $so /tmp/_C_mmasp.so
  rm -rf $W/llmprune_kernels && cp -r llmprune_kernels $W/ && rm -f $W/llmprune_kernels/_C*.so && cp /tmp/_C_mmasp.so $so
else
  rm -rf $W && mkdir -p $W/csrc && cp -r llmprune_kernels setup.py pyproject.toml $W/ && rm -f $W/llmprune_kernels/_C*.so
  cp csrc/module.cpp $W/csrc/ && cp -r csrc/sparse24 $W/csrc/
  (cd $W && time LLMPRUNE_FORCE_CUDA=1 python setup.py build_ext --inplace -q) 2>&1 | grep -v "^$" | grep -vE "warning #3306|bit-field|^Remark|C\+\+20|^ *\^|AutogradState" | tail -30
  ls $W/llmprune_kernels/_C*.so >/dev/null 2>&1 && echo "$SRC_SUM" > $W/.built || { echo "BUILD FAILED"; exit 1; }
fi
rm -rf $W/python_tests $W/benchmarks && cp -r python_tests benchmarks $W/
export PYTHONPATH=$W:/tmp/site
cd $W
python -c "import llmprune_kernels as l, torch; from llmprune_kernels.ops import sparse24_mmasp as mm; \
print(l.backends(), torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), 'mmasp available:', mm.available())"
echo "== setup done at ${SECONDS}s"

echo "== diag"
timeout $(left 300) python benchmarks/diag_mmasp.py 2>&1 | tee $OUT/diag.txt | tail -60
echo "diag rc=$? at ${SECONDS}s"

echo "== tests"
timeout $(left 240) python -m pytest -q -p no:cacheprovider python_tests/test_sparse24_mmasp.py -rfE --durations=8 \
  > $OUT/tests_mmasp.txt 2>&1
echo "tests rc=$? at ${SECONDS}s"
grep -E "passed|failed|error" $OUT/tests_mmasp.txt | tail -3
grep -q -E "[0-9]+ failed|error" $OUT/tests_mmasp.txt && sed -n '/= FAILURES =/,/short test summary/p' $OUT/tests_mmasp.txt | cut -c1-300 | head -120
tail -12 $OUT/tests_mmasp.txt

echo "== bench"
budget=$((TOTAL - SECONDS - 60)); (( budget < 30 )) && budget=30
timeout $(left 5) python benchmarks/bench_sparse24_mmasp.py --out $OUT/sparse24_mmasp_h100.json --budget $budget
echo "bench rc=$? at ${SECONDS}s"
