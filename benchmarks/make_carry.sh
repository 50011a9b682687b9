#!/usr/bin/env bash
# Builds the folder benchmarks/run_gpu.sh expects (gitignored, .carry/ unless an argument names another) from
# PyPI, for the GPU machine's Python 3.12, which reaches no network:
#   eigen3/  Eigen's headers and CMake config (cmeel-eigen's prefix)
#   site/    what the machine lacks or has in another version: bitsandbytes (its CUDA 13 library only), peft,
#            gguf, pexpect, hypothesis, jsonschema and their needs
#   lc/      llm-compressor and its needs (the AWQ anchor of bench_export.py), put on PYTHONPATH only for
#            that call: with site/ and eigen3/ it fills the 64 MiB a call may carry
# Usage: bash benchmarks/make_carry.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.carry}
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
fetch() {  # fetch FOLDER SPEC...: wheels for CPython 3.12 on manylinux x86_64 (pip matches each tag exactly)
  local platforms=() n
  for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS/$1" "${@:2}"
}
unpack() {  # unpack FOLDER TARGET
  mkdir -p "$2"
  for w in "$WHEELS/$1"/*.whl; do python3 -m zipfile -e "$w" "$2"; done
}
fetch eigen cmeel-eigen==3.4.1
fetch site bitsandbytes==0.50.2 peft==0.21.2 gguf==0.19.0 pexpect==4.9.0 ptyprocess==0.7.0 \
  hypothesis==6.170.17 sortedcontainers==2.4.0 attrs==26.1.0 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 pyyaml==6.0.4 accelerate==1.15.0 \
  psutil==7.2.2 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
fetch lc llmcompressor==0.14.0.1 compressed-tensors==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 loguru==0.7.3 datasets==4.8.4 \
  dill==0.4.1 multiprocess==0.70.19 auto-round==0.15.1
rm -rf "$DIR/eigen3" "$DIR/site" "$DIR/lc"
unpack eigen "$WHEELS/eigen-unpacked"
mkdir -p "$DIR/eigen3"
mv "$WHEELS"/eigen-unpacked/cmeel.prefix/{include,share} "$DIR/eigen3/"
unpack site "$DIR/site"
unpack lc "$DIR/lc"
# bitsandbytes ships a library per CUDA version and CPU; the machine's torch is CUDA 13
find "$DIR/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130.so' -delete
rm -rf "$DIR/lc/auto_round_extension"  # kernels llm-compressor's AWQ never imports
du -sh "$DIR"/eigen3 "$DIR"/site "$DIR"/lc
