"""Atomic training checkpoints: ``<out>/checkpoints/step-000050/`` and a ``LATEST`` pointer.

A checkpoint is written into a temporary folder next to its final name, every file flushed and fsynced,
then renamed into place (one atomic ``rename``); only after that is ``LATEST`` replaced (write a temporary
file, fsync, ``os.replace``). A process killed at any point therefore leaves either the previous checkpoint
as the latest one or the new one complete — never a half-written one that resume would pick up. Leftover
temporary folders are removed on the next save.

Contents: ``adapter/`` (PEFT format, loadable on its own), ``state.pt`` (fp32 master weights of the
LoRA parameters, optimizer and scheduler states, step, data cursor, RNG states of python, numpy, torch
CPU and CUDA, and the config it was trained with).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import KindredFormatError

LATEST = "LATEST"
STATE = "state.pt"
ADAPTER = "adapter"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, write, keep: int) -> Path:
    """Write checkpoint ``step`` atomically: ``write(folder)`` fills a temporary folder, which is then
    renamed to ``step-NNNNNN`` (the step number) and made the latest; checkpoints beyond ``keep`` go."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. the end of a resumed run that had nothing left)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f"{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    with pointer.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder ``LATEST`` points to, or None when the run has no checkpoint yet."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name.startswith("step-") or not (path / STATE).is_file():
        raise KindredFormatError(f"{pointer}: points to '{name}', which is not a complete checkpoint")
    return path


def load_state(path: Path) -> dict:
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise KindredFormatError(f"{path / STATE}: not a readable kindred checkpoint ({e})") from None
