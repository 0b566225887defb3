#!/usr/bin/env bash
# Run every benchmark suite on this machine's GPU, each in its own process, and leave one JSON per suite in
# benchmarks/results/ (score_mask, tensor_core_masks, act_norm, sparsegpt, admm, sparse24, sparse24_8bit,
# sparse_experts, e2e, quality_smollm2 + its .md table).
#
#   bash benchmarks/run_all.sh            # all GPU suites, canonical results
#   bash benchmarks/run_all.sh --quick    # fewer cases and repetitions, no quality table,
#                                         # written to $LLMPRUNE_BENCH_RESULTS (default /tmp/llmprune_bench_quick)
#   bash benchmarks/run_all.sh sparse24 e2e   # only these suites (names as above, or quality)
#
# Needs the package installed with its CUDA build (the suites skip what this build or GPU lacks and say so),
# pytest and pytest-benchmark; the quality table also needs the embedded SmolLM2 model (else it is skipped).
# SUITE_TIMEOUT (seconds, default 900) bounds each suite. The exit status is 1 if any suite failed.
set -u
cd "$(dirname "$0")/.."
QUICK=0
SUITES=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) SUITES+=("$arg") ;;
  esac
done
if [ ${#SUITES[@]} -eq 0 ]; then
  SUITES=(score_mask tensor_core_masks act_norm sparsegpt admm sparse24 sparse24_8bit sparse_experts e2e)
  [ $QUICK = 1 ] || SUITES+=(quality)
fi
export LLMPRUNE_BENCH_QUICK=$QUICK PYTHONUNBUFFERED=1
if [ $QUICK = 1 ]; then
  export LLMPRUNE_BENCH_RESULTS=${LLMPRUNE_BENCH_RESULTS:-/tmp/llmprune_bench_quick}
fi
OUTDIR=${LLMPRUNE_BENCH_RESULTS:-benchmarks/results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
$PY - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("run_all.sh: no CUDA GPU visible")
import llmprune_kernels as lk
print(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
print("backends:", lk.backends())
PY
echo "quick=$QUICK; results go to $OUTDIR"
failed=()
written=()
start_all=$SECONDS
for s in "${SUITES[@]}"; do
  file=benchmarks/bench_$s.py
  [ -f "$file" ] || { echo "unknown suite: $s"; failed+=("$s"); continue; }
  marker=$(mktemp)
  t0=$SECONDS
  echo "== $s"
  timeout "${SUITE_TIMEOUT:-900}" $PY -m pytest "$file" -q --benchmark-columns=min,median,rounds
  rc=$?
  echo "== $s: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || failed+=("$s")
  while IFS= read -r f; do written+=("$f"); echo "   wrote $f"; done < <(find "$OUTDIR" -maxdepth 1 -newer "$marker" -type f | sort)
  rm -f "$marker"
done
echo "== done in $((SECONDS - start_all)) s; results written:"
for f in "${written[@]}"; do echo "   $f"; done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
