#!/usr/bin/env bash
# Builds the folder benchmarks/run_gpu.sh expects (gitignored, .carry/ unless an argument names another) from
# PyPI, for the GPU machine's Python 3.12, which reaches no network:
#   eigen3/  Eigen's headers and CMake config (cmeel-eigen's prefix)
#   site/    what the machine lacks or has in another version: bitsandbytes (its CUDA 13 library only), peft,
#            gguf, pexpect, hypothesis, jsonschema and their needs
#   lc/      llm-compressor and its needs (the AWQ anchor of bench_export.py), put on PYTHONPATH only for
#            that call: with site/ and eigen3/ it fills the 64 MiB a call may carry
#   unsloth.tar.xz  Unsloth and unsloth_zoo 2026.10.9 with what they need that the machine lacks (trl, torchao,
#            datasets < 5 and its dill / multiprocess / fsspec, cut_cross_entropy, tyro, pydantic, hf_transfer,
#            msgspec, json5, structlog, nest-asyncio, ...; bitsandbytes and peft come from site/), Unsloth's
#            studio/ web assets and CLI left out: bench_e2e.py's Unsloth anchor (KINDRED_E2E_UNSLOTH=1) unpacks
#            it once and puts it on its subprocesses' PYTHONPATH after site/. Packed with xz so that eigen3/ +
#            site/ + unsloth.tar.xz fit one call's 64 MiB (lc/ is not carried with it)
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
# Unsloth's and unsloth_zoo's Requires-Dist less what the machine has (torch 2.11, transformers 5.17, triton 3.6,
# accelerate, numpy, pandas, pyarrow, xxhash, psutil, sentencepiece, protobuf, pillow, regex, einops, jinja2,
# httpx, aiohttp, typer, rich, click, pyyaml, wheel, huggingface_hub 1.33) and what site/ carries (bitsandbytes,
# peft); xformers and diffusers are never imported on its path. datasets 4.8.4 wants fsspec <= 2026.2.0 and
# pydantic 2.14 typing-extensions >= 4.16: carried so the machine's versions cannot break them.
fetch unsloth unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 torchao==0.18.0 datasets==4.8.4 dill==0.4.1 \
  multiprocess==0.70.19 fsspec==2026.2.0 cut-cross-entropy==25.1.1 tyro==1.0.17 docstring-parser==0.18.0 \
  typeguard==4.6.1 typing-extensions==4.16.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 hf-transfer==0.1.9 msgspec==0.23.0 json5==0.17.3 structlog==26.1.0 nest-asyncio==1.6.0
rm -rf "$DIR/eigen3" "$DIR/site" "$DIR/lc" "$DIR/unsloth.tar.xz"
unpack eigen "$WHEELS/eigen-unpacked"
mkdir -p "$DIR/eigen3"
mv "$WHEELS"/eigen-unpacked/cmeel.prefix/{include,share} "$DIR/eigen3/"
unpack site "$DIR/site"
unpack lc "$DIR/lc"
# bitsandbytes ships a library per CUDA version and CPU; the machine's torch is CUDA 13
find "$DIR/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130.so' -delete
rm -rf "$DIR/lc/auto_round_extension"  # kernels llm-compressor's AWQ never imports
unpack unsloth "$WHEELS/unsloth-site"
# Studio's web app and the CLI (the anchor imports neither); torchao's top-level test/ would shadow the stdlib's
rm -rf "$WHEELS"/unsloth-site/{studio,unsloth_cli,test}
tar -C "$WHEELS/unsloth-site" --sort=name --owner=0 --group=0 -cf - . | xz -9 -T2 >"$DIR/unsloth.tar.xz"
du -sh "$DIR"/eigen3 "$DIR"/site "$DIR"/lc "$DIR"/unsloth.tar.xz
