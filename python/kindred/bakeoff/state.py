"""What a bake-off has finished: one JSON file per candidate and stage (``state/<candidate>/<stage>.json``),
written atomically when the stage ends, so a killed bake-off continues with the first stage not written.

Each file holds the stage's result and a fingerprint of the settings it depends on; resuming with other
settings is an error naming the stage (a new ``out`` folder or ``--restart`` starts over).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from ..errors import KindredValueError

GLOBAL = "_all"  # the state folder of stages over all candidates (compare, export)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> Path:
    """``obj`` as JSON at ``path``, through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class StateStore:
    def __init__(self, out: Path):
        self.root = Path(out) / "state"

    def path(self, candidate: str, stage: str) -> Path:
        return self.root / candidate / f"{stage}.json"

    def get(self, candidate: str, stage: str, settings) -> dict | None:
        """The finished stage's record, or None when it has not finished."""
        p = self.path(candidate, stage)
        if not p.is_file():
            return None
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # written atomically, so only a foreign edit gets here: run the stage again
        if record.get("fingerprint") != fingerprint(settings):
            raise KindredValueError(
                f"{p}: the {stage} stage of {candidate!r} ran with other settings; continue with the same "
                "config, or start over with a new 'out' folder or --restart"
            )
        return record

    def put(self, candidate: str, stage: str, settings, result: dict, status: str, seconds: float) -> dict:
        record = {
            "candidate": candidate,
            "stage": stage,
            "status": status,  # "done" | "failed" | "skipped"
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": fingerprint(settings),
            "result": result,
        }
        write_json(self.path(candidate, stage), record)
        return record
