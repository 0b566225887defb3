#!/usr/bin/env bash
# Builds the standalone CUTLASS sm90 2:4 probe: benchmarks/cutlass_sm90_probe.cu linked with the
# extension's own instantiations in csrc/sparse24/cutlass_sm90 (needs nvcc >= 12.3 and CUTLASS >= 3.6
# headers, e.g. the nvidia-cutlass wheel's cutlass_library/source/include).
# Usage: [CUTLASS_INC=...] [JOBS=n] bash benchmarks/build_cutlass_probe.sh [OUT_BINARY]
set -e
CUTLASS_INC=${CUTLASS_INC:-$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}
OUTBIN=${1:-benchmarks/cutlass_sm90_probe}
OBJ=$(mktemp -d)
FLAGS="-O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -I$CUTLASS_INC -I$CUTLASS_INC/../tools/util/include -Icsrc"
SRCS="benchmarks/cutlass_sm90_probe.cu $(ls csrc/sparse24/cutlass_sm90/gemm_*.cu)"
time (echo $SRCS | tr ' ' '\n' | xargs -P ${JOBS:-$(nproc)} -I{} sh -c 'nvcc '"$FLAGS"' -c {} -o '"$OBJ"'/$(basename {} .cu).o 2>&1 | grep -v -E "^$|C7510" || true')
nvcc -gencode arch=compute_90a,code=sm_90a $OBJ/*.o -o "$OUTBIN"
rm -rf "$OBJ"
echo "built $OUTBIN"
