"""The output folder of a run: one run per folder, held by a lock, and fingerprints that tie a checkpoint to
its config and prepared data.

- ``RunLock``: ``<out>/kindred.lock``, an exclusive ``flock`` held while the run trains. The kernel drops it
  when the process dies, so a lock file left by a killed run is stale by construction and simply taken
  over; a live holder makes a second run refuse, naming its pid.
- ``check_fresh``: a fresh run (no ``--resume``) into a folder that holds another run's files refuses,
  naming ``--resume`` and ``--overwrite``; ``--overwrite`` removes exactly the files a run writes (RUN_FILES).
- ``data_fingerprint``: sha256 of the packed training rows (with their counts), and ``config_differences``:
  the config keys a resumed run must keep, compared with the config the checkpoint holds; resume names
  what differs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..atomic import refuse_symlink, remove_tree
from ..errors import KindredError, KindredValueError
from .metrics import SAMPLES

LOCK = "kindred.lock"
# What a run writes into its folder (removed by --overwrite, nothing else is).
RUN_FILES = (
    "checkpoints",
    "adapter",
    "merged",
    "tensorboard",
    "metrics.jsonl",
    "metrics.csv",
    "loss.png",
    SAMPLES,
    "config.yaml",
)
# Keys that may change between a run and its resumption (more steps, another output cadence).
RESUMABLE = {"train.max_steps", "train.epochs", "train.distributed", "device", "attn_backend"}


class RunLock:
    """An exclusive lock on the run folder for the life of the run (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = refuse_symlink(Path(out) / LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise KindredError(
                f"{out}: another kindred run (pid {holder}) is using this folder ({self.path} is locked); "
                "wait for it to finish or choose another output.dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a taker)
            self.fd = None


def run_files(out: Path) -> list[str]:
    """The names in ``out`` that a run wrote."""
    return [name for name in RUN_FILES if os.path.lexists(out / name)]


def check_fresh(out: Path, overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding another run's files, or remove them with ``overwrite``."""
    found = run_files(out)
    if not found:
        return
    if not overwrite:
        raise KindredError(
            f"{out} holds another run ({', '.join(found)}); pass --resume to continue it, or --overwrite "
            "to replace it (kindred.train(..., resume=True / overwrite=True)), or choose another output.dir"
        )
    for name in found:
        remove_tree(out / name)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _canonical(d: dict) -> dict:
    """Tuples as lists, so a config read back from JSON compares equal to the one in memory."""
    return json.loads(json.dumps(d))


def _free(key: str) -> bool:
    return key in RESUMABLE or key.startswith("output.")


def config_differences(saved: dict, now: dict) -> list[str]:
    """'key: old -> new' for every key that differs and must not."""
    a, b = flat(_canonical(saved)), flat(_canonical(now))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not _free(k)]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def data_fingerprint(packed, examples: int | None) -> dict:
    """sha256 of the packed rows' tokens, labels and sequences, with counts a message can name."""
    h = hashlib.sha256()
    for name in ("input_ids", "labels", "cu_seqlens", "seq_example"):
        a = np.ascontiguousarray(getattr(packed, name))
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return {
        "sha256": h.hexdigest(),
        "rows": int(packed.rows),
        "tokens": int(packed.real_tokens),
        "examples": int(examples if examples is not None else len(packed.example_row)),
    }


def check_same_data(saved: dict, now: dict, path: Path) -> None:
    """KindredValueError naming how the prepared data changed since the checkpoint ``path``."""
    if saved.get("sha256") == now["sha256"]:
        return
    counts = ", ".join(
        f"{saved.get(k)} -> {now[k]} {k}" for k in ("examples", "rows", "tokens") if saved.get(k) != now[k]
    )
    raise KindredValueError(
        f"{path}: cannot resume: the prepared training data differ from the checkpoint's "
        f"({counts or 'same counts, other tokens'}; data fingerprint {str(saved.get('sha256'))[:12]} -> "
        f"{now['sha256'][:12]}). Resume with the data the run started with, or start a new run"
    )
