#!/bin/bash
# Nsight Compute on the default hist select (benchmarks/profile_hist_ncu.py), then a select sweep ($V, $NAME).
export PYTHONPATH=$PWD
NCU=$(which ncu || echo /usr/local/cuda/bin/ncu)
timeout ${NCU_S:-200} $NCU --kernel-name regex:_rows_hist --launch-skip 1 --launch-count 3 --section WarpStateStats \
  --section SchedulerStats --section Occupancy --section SpeedOfLight --section LaunchStats --section SourceCounters \
  --section MemoryWorkloadAnalysis_Tables ${NCU_EXTRA:-} python benchmarks/profile_hist_ncu.py > $OUT/ncu.txt 2>&1
echo ncu rc $?
grep -v "^==PROF==" $OUT/ncu.txt | grep -E "_rows_hist_kernel|Duration|L1/TEX Cache|Issued Warp|Eligible Warps|Registers Per|Achieved Active|excessive" | cut -c1-120
[ -n "$V" ] && bash benchmarks/run_hist_sweep_gpu.sh
