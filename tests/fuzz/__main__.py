"""``python -m tests.fuzz --minutes N [--target name] [--out folder]``: fuzz every reader (or one) for N
minutes in all, niced, and print executions, rate, crashes, hangs and foreign exceptions per target.
Reproducers are written under ``--out``; copy the ones worth keeping (minimized) into tests/fuzz/corpus/.
The exit status is 1 when anything failed."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .runner import fuzz
from .targets import TARGETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="total time, split evenly over the targets")
    p.add_argument("--target", choices=sorted(TARGETS), action="append", help="fuzz only these (repeatable)")
    default_out = Path(tempfile.gettempdir()) / "kindred-fuzz-findings"
    p.add_argument("--out", type=Path, default=default_out, help="where reproducers are written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nice", type=int, default=10, help="niceness of the fuzzing processes")
    args = p.parse_args(argv)
    os.nice(args.nice)
    names = args.target or list(TARGETS)
    per_target = args.minutes * 60 / len(names)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="kindred-fuzz-seeds-") as root:
        for name in names:
            t0 = time.monotonic()
            folder = Path(root) / name
            folder.mkdir()
            seeds = TARGETS[name].build(folder)
            budget = max(per_target - (time.monotonic() - t0), 1.0)
            stats = fuzz(name, budget, args.out, seeds, seed=args.seed)
            print(stats.line(), flush=True)
            for path in stats.saved:
                print(f"    saved {path}", flush=True)
            failures += stats.failures
    if failures:
        print(f"{failures} failure(s); reproducers under {args.out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
