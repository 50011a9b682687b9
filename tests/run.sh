#!/usr/bin/env bash
# The test command: GoogleTest suite of the C++ core through CTest, then pytest (GPU tests skip without CUDA).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmake -S . -B build/ctest -G Ninja -DKINDRED_PYTHON=OFF -DKINDRED_BUILD_TESTS=ON -DKINDRED_CUDA=OFF >/dev/null
cmake --build build/ctest
(cd build/ctest && ctest --output-on-failure)
"$PY" -m pytest "$@"
