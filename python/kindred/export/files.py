"""Writing an export folder: checked before any work, built in a temporary sibling folder and renamed into
place when complete (an interrupted export leaves no half-written model, and nothing is overwritten unless
asked); safetensors shards with their index; the hashes the manifest records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import KindredValueError

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
INDEX_NAME = "model.safetensors.index.json"


def check_output(path: str | Path, overwrite: bool) -> Path:
    """The output folder, refused before work starts when it exists (without ``overwrite``) or is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KindredValueError(f"--out {path}: exists and is not a folder; choose another output path")
    if path.exists() and not overwrite:
        raise KindredValueError(
            f"--out {path}: the folder exists; pass --overwrite to replace it or choose another path"
        )
    if not path.parent.exists():
        raise KindredValueError(f"--out {path}: its parent folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``path``; on success it replaces ``path`` (renamed, the old one removed
    only after), on error it is deleted and ``path`` is left as it was."""
    path = check_output(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Tensors added one at a time, written in shards of at most ``max_bytes`` (a larger tensor gets its own)
    named as transformers names them, with ``model.safetensors.index.json`` when there is more than one."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        if max_bytes <= 0:
            raise KindredValueError(f"max shard size must be positive, got {max_bytes}")
        self.folder, self.max_bytes = Path(folder), max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in keys for _, keys in self._files):
            raise KindredValueError(f"tensor '{name}' written twice")
        n = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + n > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        f = self.folder / f".shard-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(f), metadata={"format": "pt"})
        self._files.append((f, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write what is left, give the shards their final names (and the index); returns the files."""
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            final = self.folder / "model.safetensors"
            self._files[0][0].rename(final)
            return [final]
        weight_map, out = {}, []
        for i, (f, keys) in enumerate(self._files, 1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            f.rename(final)
            out.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return out


def sha256_of(paths: list[Path]) -> str:
    """One sha256 over the files' bytes in the given order (e.g. an adapter's config and weights)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
