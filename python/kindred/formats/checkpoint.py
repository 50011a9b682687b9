"""Reading tensors out of safetensors checkpoints (single file or a sharded folder) by name prefix."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..bounded import confined, json_object
from ..errors import KindredFormatError

INDEX_NAME = "model.safetensors.index.json"


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``path`` itself, the shards its index json names (each
    confined to the folder: no absolute path, ``..`` or symlink out; all present), or its *.safetensors."""
    if path.is_file():
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json_object(index, limit=64 << 20).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KindredFormatError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
        names = set(weight_map.values())
        files = sorted(confined(path, name, f"{INDEX_NAME}: shard") for name in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise KindredFormatError(f"{index}: lists shard(s) that are not in the directory: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KindredFormatError(f"{path}: no model.safetensors (or sharded index) here")
    return files


def read_prefix(path: str | Path, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor named ``prefix + '.' + rest``, read lazily through safetensors, keyed by ``rest``."""
    out: dict[str, torch.Tensor] = {}
    for shard in shard_files(Path(path)):
        try:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.startswith(prefix + "."):
                        out[key[len(prefix) + 1 :]] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise KindredFormatError(f"{shard}: not a readable safetensors file ({e})") from None
    return out
