"""kindred.doctor() / `kindred doctor`: the report against independent sources (package metadata, torch, the
toolchain), the kernel-compatibility rules on real GPUs, and on a GPU what the driver actually loads."""

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import kindred
from kindred.installation import OPTIONAL, assess, kernel_support, parse_architectures

FAT = "80-real,86-real,89-real,90-real,100-real,120-real,80-virtual"  # the CMake default with nvcc 13


def test_parse_architectures():
    assert parse_architectures(FAT) == (["80", "86", "89", "90", "100", "120"], ["80"])
    assert parse_architectures("90") == (["90"], ["90"])
    assert parse_architectures("90a-real,100f-real,90-virtual") == (["90a", "100f"], ["90"])
    assert parse_architectures("") == ([], [])
    with pytest.raises(kindred.KindredValueError, match="sm90"):
        parse_architectures("80-real,sm90")


@pytest.mark.parametrize(
    ("archs", "gpu", "cc", "expected"),
    [
        (FAT, "A100", (8, 0), ("sass", "sm_80")),
        (FAT, "A10 / RTX 3090", (8, 6), ("sass", "sm_86")),
        (FAT, "Jetson Orin", (8, 7), ("sass", "sm_86")),  # 8.6 machine code runs on 8.7
        (FAT, "RTX 4090 / L40S", (8, 9), ("sass", "sm_89")),
        (FAT, "H200", (9, 0), ("sass", "sm_90")),
        (FAT, "B200", (10, 0), ("sass", "sm_100")),
        (FAT, "B300", (10, 3), ("sass", "sm_100")),
        (FAT, "Thor", (11, 0), ("ptx", "compute_80")),  # no 11.x machine code: the driver compiles the PTX
        (FAT, "RTX 5090", (12, 0), ("sass", "sm_120")),
        (FAT, "T4", (7, 5), ("none", None)),
        ("90", "RTX 4090", (8, 9), ("none", None)),  # PTX 9.0 cannot be compiled for an older GPU
        ("90", "B200", (10, 0), ("ptx", "compute_90")),
        ("90a-real", "H200", (9, 0), ("sass", "sm_90a")),
        ("90a-real,90a-virtual", "B200", (10, 0), ("none", None)),  # arch-specific code: 9.0 only
        ("100f-real", "B300", (10, 3), ("sass", "sm_100f")),
        ("", "H200", (9, 0), ("none", None)),
    ],
)
def test_kernel_support(archs, gpu, cc, expected):
    assert kernel_support(archs, cc) == expected, gpu


def test_assess_problems_and_fixes():
    cuda_build = {"cuda": True, "cuda_architectures": FAT}
    ok = {"runtime": 13000, "driver": 13000, "binary": 90, "ptx": 90, "error": ""}
    assert assess(cuda_build, (9, 0), ok) == {
        "kernels": "sass",
        "target": "sm_90",
        "loaded": "sm_90 from compute_90",
        "problem": None,
        "fix": None,
    }
    no_image = {"runtime": 13000, "driver": 13000, "binary": 0, "ptx": 0, "error": "no kernel image"}
    t4 = assess(cuda_build, (7, 5), no_image)
    assert "not sm_75" in t4["problem"] and t4["fix"].startswith("CUDAARCHS=75 pip install")
    old_driver = {"runtime": 13000, "driver": 12040, "binary": 0, "ptx": 0, "error": "driver too old"}
    h100 = assess(cuda_build, (9, 0), old_driver)
    assert "driver too old" in h100["problem"] and "CUDA 13.0+" in h100["fix"]
    cpu = assess({"cuda": False, "cuda_architectures": ""}, (9, 0), None)
    assert (
        cpu["kernels"] == "none" and "without CUDA" in cpu["problem"] and "--no-binary kindred" in cpu["fix"]
    )


def test_report_matches_independent_sources():
    report = kindred.doctor()
    assert report["kindred"] == kindred.__version__
    assert report["torch"] == torch.__version__
    assert report["cuda"]["torch_cuda"] == torch.version.cuda
    assert report["location"] == os.path.dirname(kindred._core.__file__)
    assert report["build"]["cuda"] == kindred.cuda_compiled()
    assert report["sentencepiece"] == kindred.data.sentencepiece_backend()
    assert report["sentencepiece"].startswith("kindred core") == kindred.sentencepiece_compiled()
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for name in OPTIONAL:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        assert report["optional"][name] == version, name
        # the import system agrees on what is there (without importing the heavy ones)
        assert (
            importlib.util.find_spec(name.replace("-cpp-python", "_cpp").replace("-", "_")) is not None
        ) == (version is not None), name
    sass, ptx = parse_architectures(report["build"]["cuda_architectures"])
    assert (report["build"]["sass"], report["build"]["ptx"]) == (sass, ptx)
    assert bool(sass or ptx) == report["build"]["cuda"]


def test_build_info_matches_toolchain():
    build = kindred.doctor()["build"]
    compiler, version = build["compiler"].split(" ", 1)
    assert compiler in {"GNU", "Clang", "AppleClang", "IntelLLVM"} and re.fullmatch(r"\d+(\.\d+)+", version)
    assert re.fullmatch(r"3\.\d+\.\d+", build["eigen"])
    # A wheel may come from another machine's compilers: check those of a build made here (the checkout's).
    local = kindred.__file__.startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    gxx, nvcc = shutil.which("g++"), shutil.which("nvcc")
    if local and compiler == "GNU" and gxx:
        out = subprocess.run([gxx, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
        assert version == out
    if local and build["cuda"] and nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        assert f"V{build['cuda_compiler']}" in out


def test_cli_json_short_and_table(capsys):
    from kindred.cli import main
    from kindred.installation import kernels_line

    report = kindred.doctor()
    assert main(["doctor", "--json"]) == (1 if report["problems"] else 0)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    main(["doctor", "--short"])
    short = capsys.readouterr().out.strip()
    assert "\n" not in short and short.startswith(f"kindred {kindred.__version__}, torch {torch.__version__}")
    assert kernels_line(report) in short
    main(["doctor"])
    table = capsys.readouterr().out
    for row in ("kindred doctor", "torch", "kernels", "sentencepiece", *OPTIONAL):
        assert row in table, row


@pytest.mark.gpu
def test_gpu_kernels_load_and_ptx_fallback():
    """On a GPU: the driver loads machine code for its capability when the build has it, and with
    CUDA_FORCE_PTX_JIT=1 (what a GPU newer than every machine code in the build gets) the embedded PTX, on
    which quantize_nf4 still matches the CPU reference bit for bit."""
    report = kindred.doctor()
    assert kindred.cuda_compiled() and not report["problems"], report["problems"]
    gpu = report["gpus"][0]
    cc = torch.cuda.get_device_capability(0)
    assert gpu["capability"] == f"{cc[0]}.{cc[1]}"
    assert gpu["name"] == torch.cuda.get_device_name(0)
    if gpu["kernels"] == "sass":
        assert gpu["loaded"].startswith(f"sm_{cc[0]}{cc[1]} ")
    ptx = [int(a) for a in report["build"]["ptx"] if a.isdigit() and int(a) <= cc[0] * 10 + cc[1]]
    if not ptx:
        pytest.skip("this build holds no PTX that this GPU can compile")
    script = (
        "import json, torch, kindred\n"
        "w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)\n"
        # the custom op under ops.quantize_nf4: its finiteness check is a torch kernel, and torch's
        # wheels hold no PTX this GPU may JIT (only kindred's own launches are under test here)
        "from kindred._ops.quant import quantize_nf4\n"
        "a = quantize_nf4(w.cuda(), 64, False)\n"
        "b = quantize_nf4(w, 64, False)\n"
        "same = torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])\n"
        "print(json.dumps([kindred.doctor()['gpus'][0]['loaded'], same]))\n"
    )
    env = dict(os.environ, CUDA_FORCE_PTX_JIT="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    loaded, same = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == f"sm_{cc[0]}{cc[1]} from compute_{max(ptx)}" and same
