set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.carry/site" CMAKE_PREFIX_PATH="$PWD/.carry/eigen3" CMAKE_BUILD_PARALLEL_LEVEL=16
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps -e . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Cbuild-dir=build/gpu 2>&1 | tail -5
python3 -c "import kindred; print('cuda', kindred.cuda_compiled(), 'sp', kindred.sentencepiece_compiled())"
python3 -c "import tokenizers, sys; print('tokenizers', tokenizers.__version__)" 2>&1 | tail -1
python3 -m pytest tests/test_tokens.py -q -p no:cacheprovider 2>&1 | tail -6
KINDRED_COMMIT=$(cat .commit 2>/dev/null) python3 -m pytest benchmarks/bench_tokens.py -m benchmark -k count_kernel -q -s -p no:cacheprovider 2>&1 | grep -E "count_trainable|passed|failed|Error" 
mkdir -p $OUT && cp benchmarks/results/tokens.csv $OUT/ 2>/dev/null; true
