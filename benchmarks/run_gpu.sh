#!/usr/bin/env bash
# One call on the GPU machine: build kindred for sm_90, run the GPU tests and the benchmarks, copy logs and
# result CSVs to $OUT. Expects the carried folder .carry/ (Eigen's headers and CMake config under
# .carry/eigen3, a slim bitsandbytes under .carry/site). Usage: KINDRED_COMMIT=<sha> bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kindred-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.carry/site${PYTHONPATH:+:$PYTHONPATH}"
export CMAKE_PREFIX_PATH="$PWD/.carry/eigen3" CMAKE_BUILD_PARALLEL_LEVEL=16
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
  -Cbuild-dir=build/gpu 2>&1 | tail -20 | tee "$OUT/build.log"
python3 -c "import kindred; assert kindred.cuda_compiled(), 'CUDA kernels missing'; print('kindred built with CUDA')" \
  || exit 1
# Usage: run_gpu.sh [pytest -k expression for the benchmarks, default: all]
python3 -m pytest tests -m gpu -q -p no:cacheprovider --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python3 -m pytest tests -q -p no:cacheprovider --tb=short 2>&1 | tee "$OUT/all_tests.log" | tail -4
python3 -m pytest benchmarks -m benchmark -q -s -p no:cacheprovider ${1:+-k "$1"} 2>&1 | tee "$OUT/bench.log" \
  | grep -vE '^\s*$' | tail -60
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
exit 0
