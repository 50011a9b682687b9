#!/usr/bin/env bash
# One call on the GPU machine: build kindred for sm_90, then the named steps, logs and result CSVs to $OUT.
# Expects the carried folder .carry/ that benchmarks/make_carry.sh builds (Eigen under .carry/eigen3, the
# Python packages the machine lacks under .carry/site; .carry/lc, llm-compressor, only where PYTHONPATH names it).
# Usage: KINDRED_COMMIT=<sha> bash benchmarks/run_gpu.sh STEP...
#   tests[=EXPR]      the GPU tests (pytest -m gpu, optionally -k EXPR)
#   doctor            kindred doctor --json
#   memcheck=EXPR     compute-sanitizer memcheck of kindred's kernels in the GPU tests selected by -k EXPR
#   bench=FILE[:EXPR] one benchmark file (pytest -m benchmark, optionally -k EXPR)
# Any step may end in @SECONDS: it is stopped after that long (counted as failed), so one slow step cannot
# use up the call.
# Exits non-zero when the build or any step fails (every step still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kindred-out}
mkdir -p "$OUT"
: "${KINDRED_COMMIT:?set KINDRED_COMMIT: the copy on the machine has no git history}"
export KINDRED_COMMIT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.carry/site${PYTHONPATH:+:$PYTHONPATH}"
export CMAKE_PREFIX_PATH="$PWD/.carry/eigen3" CMAKE_BUILD_PARALLEL_LEVEL=16
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
SECONDS=0
python3 -m pip install -q --no-build-isolation --no-deps -e . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
  -Cbuild-dir=build/gpu >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "== build: $SECONDS s" | tee "$OUT/steps.txt"
python3 -c "import kindred; assert kindred.cuda_compiled(), 'CUDA kernels missing'" || exit 1
PYTEST=(python3 -m pytest -q -p no:cacheprovider --tb=short)
failed=()
for step in "$@"; do
  limit=0
  case $step in *@*) limit=${step##*@} step=${step%@*} ;; esac
  name=${step%%=*}
  arg=${step#*=}
  tag=$(printf %s "$arg" | tr -c 'A-Za-z0-9._-' _ | cut -c1-40)
  log=$OUT/$name.log
  [ "$arg" = "$step" ] || log=$OUT/${name}_$tag.log
  SECONDS=0
  case $name in
    tests) [ "$arg" = "$step" ] && arg=""
      timeout "$limit" "${PYTEST[@]}" tests -m gpu ${arg:+-k "$arg"} >"$log" 2>&1 ;;
    doctor) timeout "$limit" python3 -X faulthandler -m kindred doctor --json >"$log" 2>&1 ;;
    # only kindred's kernels (namespace kindred) are checked: torch's and cuBLAS's run uninstrumented
    memcheck) timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
      --kernel-regex kns=kindred "${PYTEST[@]}" -v tests -m gpu -k "$arg" >"$log" 2>&1 ;;
    bench) file=${arg%%:*} expr=${arg#*:}
      [ "$expr" = "$arg" ] && expr=""
      timeout "$limit" "${PYTEST[@]}" -s -m benchmark "$file" ${expr:+-k "$expr"} >"$log" 2>&1 ;;
    *) echo "unknown step $step" >"$log"; false ;;
  esac
  rc=$?
  echo "== $step: rc $rc, $SECONDS s" | tee -a "$OUT/steps.txt"
  tail -6 "$log"
  [ $rc = 0 ] || failed+=("$step")
done
cp benchmarks/results/*.csv benchmarks/results/*.md benchmarks/results/*.png python/kindred/plan/calibration.json \
  "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf results.tgz --remove-files ./*.csv ./*.md ./*.png ./*.json ./*.log 2>/dev/null)
[ ${#failed[@]} = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
