"""GPU table (memory, bandwidth, dense bf16 rate; sourced in gpus.json) and name lookup."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import KindredValueError

_DATA = Path(__file__).with_name("gpus.json")
GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    id: str
    name: str
    memory_gb: float  # datasheet "GB"; the DRAM holds that many GiB
    bandwidth_gbs: float | None = None
    bf16_tflops: float | None = None
    driver_names: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    backend: str = (
        "cuda"  # cuda: kindred trains here; rocm / metal: estimates only (kindred's kernels are CUDA)
    )
    decode_measured: dict | None = (
        None  # a measured batch-1 decode {model, format, context, tokens_per_s, source}
    )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GIB)

    @property
    def kindred_trains(self) -> bool:
        return self.backend == "cuda"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "memory_gb": self.memory_gb,
            "bandwidth_gbs": self.bandwidth_gbs,
            "bf16_tflops": self.bf16_tflops,
            "backend": self.backend,
            "sources": list(self.sources),
        }


def load_gpus(path: str | Path = _DATA) -> dict[str, GPU]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {
        g["id"]: GPU(
            g["id"],
            g["name"],
            g["memory_gb"],
            g["bandwidth_gbs"],
            g["bf16_tflops"],
            tuple(g.get("driver_names", ())),
            tuple(g["sources"]),
            g.get("backend", "cuda"),
            g.get("decode_measured"),
        )
        for g in data["gpus"]
    }


GPUS = load_gpus()


def _key(name: str) -> str:
    return (
        name.lower()
        .replace("nvidia", "")
        .replace("geforce", "")
        .replace(" ", "")
        .replace("-", "")
        .replace("_", "")
    )


def get_gpu(name: str) -> GPU:
    """A GPU by id, display name or driver name ("rtx 4090", "NVIDIA H100 80GB HBM3"); suggests close ones."""
    names: dict[str, str] = {}
    for gpu in GPUS.values():
        for n in (gpu.id, gpu.name, *gpu.driver_names):
            names[_key(n)] = gpu.id
    key = _key(name)
    if key in names:
        return GPUS[names[key]]
    prefixed = sorted({gid for n, gid in names.items() if key and n.startswith(key)})
    if len(prefixed) == 1:
        return GPUS[prefixed[0]]
    close = prefixed or [names[c] for c in difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)]
    hint = ", ".join(dict.fromkeys(close)) or ", ".join(GPUS)
    raise KindredValueError(f"unknown GPU {name!r}; closest known: {hint} (or pass --vram GB)")


def custom_gpu(vram_gb: float) -> GPU:
    """A GPU known only by its memory: fits are checked, time estimates are left out."""
    if not vram_gb > 0:
        raise KindredValueError(f"--vram must be a positive number of GB, got {vram_gb}")
    return GPU("custom", f"{vram_gb:g} GB GPU", float(vram_gb))
