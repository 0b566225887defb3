#!/bin/bash
# Select sweep of hist launch variants on the GPU (Triton only, no C++ build); figures to $OUT.
# Usage: V='[{"select":"hist",...}, ...]' NAME=run9b bash benchmarks/run_hist_sweep_gpu.sh ["pytest -k expression"]
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
LLMPRUNE_BENCH_SELECT_VARIANTS="$V" LLMPRUNE_BENCH_TRIALS=${TRIALS:-3} \
LLMPRUNE_BENCH_OUT=$OUT/score_mask_hist_h100_$NAME.json timeout ${SWEEP_S:-300} \
  python -m pytest -q -s -p no:cacheprovider benchmarks/bench_score_mask.py -k "select_variants ${1:-}" > $OUT/sweep.log 2>&1
echo sweep rc $?
tail -3 $OUT/sweep.log
python - <<'PY'
import json, os
d = json.load(open(f"{os.environ['OUT']}/score_mask_hist_h100_{os.environ['NAME']}.json"))
for e in d["select"]:
    print(e["shape"], "floor %.4f" % e["copy_floor_ms"])
    for r in e["variants"]:
        print("   ", json.dumps(r["tune"]), "%.4f %.3f" % (r["ms"], r["over_copy_floor"]) if "ms" in r else r.get("error"))
PY
