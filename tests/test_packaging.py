"""Packaging: what CMake finds (configure only, seconds). The slow paths — the sdist, a wheel built from it
in pip's isolated environment with the system Eigen hidden, auditwheel, the installed wheel on another torch
without a compiler — run in .ci/wheel (and the CUDA wheel on a GPU in .ci/gpu_wheel.sh)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
cmake = shutil.which("cmake")
pytestmark = pytest.mark.skipif(cmake is None, reason="needs cmake")


def _configure(tmp_path, *defines: str, python: str = sys.executable) -> str:
    base = ["-S", str(ROOT), "-B", str(tmp_path / "b"), "-DKINDRED_PYTHON=OFF", "-DKINDRED_CUDA=OFF"]
    out = subprocess.run(
        [cmake, *base, f"-DPython3_EXECUTABLE={python}", *defines],  # a later -D wins
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("CUDAARCHS", "PYTHONPATH")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _cmeel_prefix(python: str) -> Path | None:
    code = (
        "import sys, os; print(*[d for d in sys.path if os.path.isdir(os.path.join(d, 'cmeel.prefix'))][:1])"
    )
    found = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()
    return Path(found) / "cmeel.prefix" if found else None


def test_build_requirements_bring_eigen():
    tomllib = pytest.importorskip("tomllib")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(r.startswith("cmeel-eigen") for r in requires), requires


def test_eigen_from_the_python_environment_first(tmp_path):
    prefix = _cmeel_prefix(sys.executable)
    if prefix is None:
        pytest.skip("cmeel-eigen is not installed in this Python (.ci/setup installs it)")
    log = _configure(tmp_path)
    m = re.search(r"kindred: Eigen (\S+) from (\S+)", log)
    assert m and Path(m[2]).resolve() == (prefix / "share" / "eigen3" / "cmake").resolve(), log
    # the version CMake reports is the one cmeel installed
    assert f'"{m[1]}"' in (prefix / "share" / "eigen3" / "cmake" / "Eigen3ConfigVersion.cmake").read_text()


def test_system_eigen_when_the_environment_has_none(tmp_path):
    system = Path("/usr/share/eigen3/cmake/Eigen3Config.cmake")
    python = shutil.which("python3", path="/usr/bin")
    if not system.exists() or python is None or _cmeel_prefix(python) is not None:
        pytest.skip("needs a system Eigen and a Python without cmeel-eigen (Debian's /usr/bin/python3)")
    log = _configure(tmp_path, python=python)
    assert "kindred: Eigen 3." in log and "from /usr/share/eigen3/cmake" in log, log


@pytest.mark.packaging  # about a minute (nvcc's checks): deselected by default, .ci/wheel runs it
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_default_cuda_architectures_follow_nvcc(tmp_path):
    """Machine code for each of 80 86 89 90 100 120 that this nvcc can build, plus compute_80 PTX."""
    codes = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    want = [f"{a}-real" for a in (80, 86, 89, 90, 100, 120) if f"sm_{a}" in codes] + ["80-virtual"]
    log = _configure(tmp_path, "-DKINDRED_CUDA=ON")
    assert f"kindred: CUDA kernels ON for architectures {';'.join(want)}" in log, log
