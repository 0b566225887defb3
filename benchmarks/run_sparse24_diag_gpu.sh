#!/usr/bin/env bash
# One GPU call of 2:4 diagnostics, steps named in MODE (in this order), sharing gpu_common.sh's CUDA build:
#   build    CUDA + cuSPARSELt build of csrc/ (reused while csrc/ is unchanged and the machine is warm)
#   tests    CUDA tests of the cuSPARSELt op (every layout) and of the mma.sp op -> $OUT/diag_tests.txt
#   layouts  benchmarks/diag_cslt_layouts.py -> $OUT/sparse24_cslt_layouts_h100.json (each layout in its own process)
#   ncu      Nsight Compute of the mma.sp kernel at M = 8 and M = 16 (4096^2 fp16) -> $OUT/ncu_mmasp_m16.txt
#   mmasp    benchmarks/bench_sparse24_mmasp.py at MMASP_MS (default 8,16) -> $OUT/sparse24_mmasp_h100.json
# Usage (repo root, device machine): MODE="build tests layouts ncu mmasp" bash benchmarks/run_sparse24_diag_gpu.sh
source benchmarks/gpu_common.sh
MODE=" ${MODE:-build tests layouts ncu mmasp} "
has() { [[ "$MODE" == *" $1 "* ]]; }
has build && build_ext
stage_tree
cd $W
echo "== setup done at ${SECONDS}s"
if has tests; then
  timeout ${TESTS_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider -rfE --tb=short \
    python_tests/test_sparse24_matmul.py python_tests/test_sparse24_mmasp.py -k "cusparselt or cuda" \
    > $OUT/diag_tests.txt 2>&1
  echo "tests rc=$? at ${SECONDS}s"; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/diag_tests.txt | tail -20
fi
if has layouts; then
  timeout ${LAYOUTS_TIMEOUT:-200} python benchmarks/diag_cslt_layouts.py $OUT/sparse24_cslt_layouts_h100.json \
    > $OUT/cslt_layouts_log.txt 2>&1
  echo "layouts rc=$? at ${SECONDS}s"; grep -vE "^\{" $OUT/cslt_layouts_log.txt | tail -30
fi
if has ncu; then
  MMASP_PROFILE_CASES=${PROFILE_CASES:-"8:4,1,4;16:4,1,4"} MMASP_PROFILE_REPS=1 timeout ${NCU_TIMEOUT:-120} \
    /usr/local/cuda/bin/ncu -c 4 -k regex:mmasp --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    python benchmarks/diag_mmasp_profile.py --no-timing > $OUT/ncu_mmasp_m16.txt 2>&1
  echo "ncu rc=$? at ${SECONDS}s"
  grep -E "mmasp_kernel|Duration|Memory Throughput|DRAM Throughput|Stall|Warp Cycles Per Issued|Issued Warp|Achieved Occupancy|Registers Per|Grid Size|Block Size" \
    $OUT/ncu_mmasp_m16.txt | head -80
fi
if has mmasp; then
  timeout ${MMASP_TIMEOUT:-150} python benchmarks/bench_sparse24_mmasp.py --out $OUT/sparse24_mmasp_h100.json \
    --ms ${MMASP_MS:-8,16} --budget $(( ${MMASP_TIMEOUT:-150} - 40 )) 2>&1 | tail -25
  echo "mmasp bench rc=$? at ${SECONDS}s"
fi
exit 0
