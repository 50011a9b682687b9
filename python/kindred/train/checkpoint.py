"""Atomic training checkpoints: ``<out>/checkpoints/step-000050/`` and a ``LATEST`` pointer.

Order of a save (kindred.atomic): the checkpoint is written into a temporary folder, every file and subfolder
fsynced, the folder renamed to ``step-NNNNNN`` (an existing one of that name swapped out, never deleted
first) and the parent fsynced; only then is ``LATEST`` replaced atomically. LATEST therefore only ever
names a checkpoint whose files are all on disk: a process killed at any point leaves the previous
checkpoint as the latest one or the new one complete. A failed write (disk full) removes the temporary
folder and raises a KindredError naming the folder; the last good checkpoint stays the latest.

Contents: ``adapter/`` (PEFT format, loadable on its own), ``state.json`` and ``state.safetensors``: the
fp32 master weights of the LoRA parameters, optimizer and scheduler states, step, data cursor, RNG states
(python, numpy, torch CPU and CUDA), the config it was trained with and fingerprints of that config and of
the prepared data. Nothing in a checkpoint is executable: JSON and safetensors are parsed, never unpickled;
a malformed or hostile one is a KindredFormatError. ``LATEST`` is confined to the run: it must name a
``step-N`` folder directly inside ``checkpoints/``, not a link.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..atomic import (
    WriteError,
    clean_temp,
    fault_point,
    is_write_failure,
    refuse_symlink,
    remove_tree,
    write_bytes,
    write_error,
    write_folder,
)
from ..errors import KindredError, KindredFormatError

LATEST = "LATEST"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
LEGACY_STATE = "state.pt"
ADAPTER = "adapter"
FORMAT = "kindred-checkpoint"
VERSION = 1
_STEP = re.compile(r"step-(\d{6,})")
_MAX_JSON = 64 << 20  # a checkpoint's state.json is a few hundred kB; more is not one


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the published checkpoint folders, oldest first."""
    found = []
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(out_dir: str | Path, step: int, write, keep: int) -> Path:
    """Write checkpoint ``step`` atomically: ``write(folder)`` fills a temporary folder, which becomes
    ``step-NNNNNN`` and then the latest; older checkpoints beyond ``keep`` (and any newer one left by an
    interrupted run that this one has rewound) are removed."""
    root = checkpoint_root(out_dir)
    refuse_symlink(root)
    final = root / f"step-{step:06d}"

    def fill(folder: Path) -> None:
        write(folder)
        fault_point("checkpoint-files")

    try:
        if not root.is_dir():
            root.mkdir(parents=True)
        clean_temp(root)
        write_folder(final, fill)
        fault_point("checkpoint-rename")
        write_bytes(root / LATEST, (final.name + "\n").encode(), fault="latest")
    except Exception as e:
        if not is_write_failure(e):
            raise
        kept = _latest_name(root) or "none yet"
        failure = e if isinstance(e, WriteError) else write_error(root, final.name, e)
        raise WriteError(f"{failure}; the last good checkpoint ({kept}) is kept") from e
    ordered = [f for n, f in _steps(root) if n <= step]
    stale = [f for n, f in _steps(root) if n > step] + ordered[: max(len(ordered) - keep, 0)]
    for folder in stale:
        if folder != final:
            remove_tree(folder)
    return final


def _latest_name(root: Path) -> str | None:
    try:
        latest = latest_checkpoint(root.parent)
    except KindredError:
        return None
    return latest.name if latest else None


def _read_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file (not a link), at most ``limit`` of them, else KindredFormatError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise KindredFormatError(f"{path}: cannot read ({e.strerror or e}; links are not followed)") from None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise KindredFormatError(f"{path}: {size:,} bytes, more than a checkpoint's {limit:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(size)
    finally:
        os.close(fd)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder ``LATEST`` points to, or None when the run has no checkpoint yet."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if not os.path.lexists(pointer):
        return None
    if root.is_symlink() or pointer.is_symlink():
        link = root if root.is_symlink() else pointer
        raise KindredFormatError(f"{link} is a symbolic link: a checkpoint is read only from inside the run")
    raw = _read_file(pointer, 64)
    name = raw.decode("utf-8", "replace").strip()
    if not _STEP.fullmatch(name):
        raise KindredFormatError(f"{pointer}: must name a step-NNNNNN folder of {root}, got {name[:40]!r}")
    path = root / name
    if path.is_symlink() or not path.is_dir():
        raise KindredFormatError(f"{pointer}: points to '{name}', not a checkpoint folder of the run")
    if not (path / STATE_JSON).is_file():
        if (path / LEGACY_STATE).exists():
            raise KindredFormatError(
                f"{path}: holds {LEGACY_STATE}, a pickle (from an older kindred, or planted); it is never "
                "loaded because unpickling can run code. Start the run again (--overwrite)"
            )
        raise KindredFormatError(f"{pointer}: points to '{name}', which is not a complete checkpoint")
    return path


# ---- state: JSON + safetensors ---------------------------------------------------------------------------
def _encode(value, tensors: dict, key: str):
    """``value`` as JSON: tensors move to ``tensors`` ({"tensor": name}); dicts with non-string keys become
    {"items": [[key, value], ...]}; tuples become lists."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}}
        return {"items": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {key}: cannot store a {type(value).__name__}")


def _decode(value, tensors: dict, where: str):
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"tensor"} and isinstance(value["tensor"], str):
        if value["tensor"] not in tensors:
            name = value["tensor"][:80]
            raise KindredFormatError(f"{where}: names tensor {name!r}, not in {STATE_TENSORS}")
        return tensors[value["tensor"]]
    if set(value) == {"dict"} and isinstance(value["dict"], dict):
        return {k: _decode(v, tensors, where) for k, v in value["dict"].items()}
    if set(value) == {"items"} and isinstance(value["items"], list):
        out = {}
        for item in value["items"]:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], (int, str)):
                raise KindredFormatError(f"{where}: a dict item must be [key, value], got {str(item)[:80]}")
            out[item[0]] = _decode(item[1], tensors, where)
        return out
    raise KindredFormatError(f"{where}: unexpected object with keys {sorted(value)[:5]}")


def write_state(folder: Path, state: dict) -> None:
    """``state`` (plain values and tensors) as ``state.json`` + ``state.safetensors`` in ``folder``."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "version": VERSION, "state": _encode(state, tensors, "state")}
    write_bytes(folder / STATE_TENSORS, save(tensors))
    write_bytes(folder / STATE_JSON, json.dumps(doc, allow_nan=True).encode())


# Top-level keys of a checkpoint's state and their types (anything else: KindredFormatError).
_KEYS = {
    "step": int,
    "cursor": int,
    "rows_per_step": int,
    "master": list,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "eval_losses": list,
    "config": dict,
    "fingerprint": dict,
}


def load_state(path: Path) -> dict:
    """The state of checkpoint folder ``path``, parsed and its shape checked (KindredFormatError if not)."""
    from safetensors.torch import load

    where = path / STATE_JSON
    try:
        doc = json.loads(_read_file(where, _MAX_JSON))
    except (ValueError, RecursionError) as e:
        raise KindredFormatError(f"{where}: not a kindred checkpoint's JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise KindredFormatError(f"{where}: not a {FORMAT} version {VERSION} file")
    blob = path / STATE_TENSORS
    try:
        tensors = load(_read_file(blob, 1 << 40))
    except KindredFormatError:
        raise
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise KindredFormatError(f"{blob}: not a readable safetensors file ({str(e)[:120]})") from None
    try:
        state = _decode(doc.get("state"), tensors, str(where))
    except RecursionError:
        raise KindredFormatError(f"{where}: nested too deeply") from None
    if not isinstance(state, dict):
        raise KindredFormatError(f"{where}: 'state' must be an object")
    for key, kind in _KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise KindredFormatError(f"{where}: '{key}' must be a {kind.__name__}, got {str(value)[:60]}")
        if kind is int and value < 0:
            raise KindredFormatError(f"{where}: '{key}' must be >= 0, got {value}")
    if not all(isinstance(t, torch.Tensor) for t in state["master"]):
        raise KindredFormatError(f"{where}: 'master' must list tensors")
    return state
