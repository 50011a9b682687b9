"""Reading tensors out of safetensors checkpoints (single file or a sharded folder) by name prefix."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import KindredFormatError


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KindredFormatError(f"{index}: not a safetensors index ({e})") from None
        return sorted({path / f for f in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KindredFormatError(f"{path}: no .safetensors file here")
    return files


def read_prefix(path: str | Path, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor named ``prefix + '.' + rest``, read lazily through safetensors, keyed by ``rest``."""
    out: dict[str, torch.Tensor] = {}
    for shard in _shards(Path(path)):
        try:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.startswith(prefix + "."):
                        out[key[len(prefix) + 1 :]] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise KindredFormatError(f"{shard}: not a readable safetensors file ({e})") from None
    return out
