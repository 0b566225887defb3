#!/usr/bin/env bash
# Static check of the mma.sp kernel on a machine without a GPU: compile its 16-bit and 8-bit ops
# (csrc/sparse24/sparse24_mmasp.cu, sparse24_mmasp8.cu) for sm_90 with nvcc and print, per kernel instance, registers / spills (ptxas -v) and the counts of sparse MMAs
# (HMMA.SP), streamed 16-byte weight loads (LDG.E.NA.128), ldmatrix (LDSM) and x copies (LDGSTS).
# A CPU-only torch lacks c10/cuda/impl/cuda_cmake_macros.h: a stub is written to a temporary directory.
set -e
T=$(mktemp -d); trap 'rm -rf $T' EXIT
mkdir -p $T/stub/c10/cuda/impl && printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $T/stub/c10/cuda/impl/cuda_cmake_macros.h
INC=$(python -c "import torch.utils.cpp_extension as c, sysconfig; print(' '.join('-I'+p for p in c.include_paths()), '-I'+sysconfig.get_paths()['include'])")
CO=$(command -v cuobjdump || python -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
for src in sparse24_mmasp.cu sparse24_mmasp8.cu; do
  echo "== $src"
  nvcc -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Xptxas -v -I$T/stub $INC -Icsrc -DLLMPRUNE_WITH_CUDA=1 \
    -c csrc/sparse24/$src -o $T/k.o 2>&1 | grep -E "error|Compiling entry|registers|spill" | sed 's/ptxas info *: //'
  $CO -sass $T/k.o > $T/all.sass
  rm -f $T/fn*
  (cd $T && csplit -s -z -f fn all.sass '/Function :/' '{*}')
  for f in $T/fn*; do
    n=$(head -1 $f | grep -oE "mmasp_kernelI[^ ]*|probe_kernel[^ ]*") || continue
    echo "$n: $(grep -oE "HMMA[.A-Z0-9_]*|LDG\.E\.NA\.128[.A-Z]*|LDGSTS[.A-Z0-9_]*|LDSM[.A-Z0-9_]*" $f | sort | uniq -c | tr -s ' \n' ' ')"
  done
done
