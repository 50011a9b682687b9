#!/usr/bin/env bash
# Issue 3 on the GPU machine: build kindred for sm_90 (no sentencepiece library there: the optional part is
# left out), run the tokens GPU tests (CUDA kernels against the CPU reference) and the count / position-id
# kernel benchmark; copy the CSV to $OUT. Expects .carry/eigen3 like benchmarks/run_gpu.sh (and, optionally,
# hypothesis under .carry/site for the packing property test).
# Usage: KINDRED_COMMIT=<sha> bash benchmarks/run_gpu_tokens.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kindred-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.carry/site${PYTHONPATH:+:$PYTHONPATH}"
export CMAKE_PREFIX_PATH="$PWD/.carry/eigen3" CMAKE_BUILD_PARALLEL_LEVEL=16
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
  -Cbuild-dir=build/gpu 2>&1 | tail -20 | tee "$OUT/build.log"
python3 -c "import kindred; assert kindred.cuda_compiled(); print('CUDA', True, 'sentencepiece', kindred.sentencepiece_compiled())" \
  || exit 1
python3 -m pytest tests/test_tokens.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tokens_tests.log" | tail -8
python3 -m pytest benchmarks/bench_tokens.py -m benchmark -k count_kernel -q -s -p no:cacheprovider 2>&1 \
  | tee "$OUT/bench_tokens.log" | grep -E "count_trainable|passed|failed|rror"
cp benchmarks/results/tokens.csv "$OUT/" 2>/dev/null
exit 0
