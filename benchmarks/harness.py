"""Timing and results for kindred's benchmarks.

Timing: CUDA events around the op only, warm-up first, L2 flushed before every rep (a 2×L2-sized write
outside the timed region), median of the reps. Results: one CSV per family under benchmarks/results/,
rows appended, one shared header.
"""

from __future__ import annotations

import csv
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
HEADER = [
    "date",
    "commit",
    "gpu",
    "family",
    "op",
    "impl",
    "shape",
    "dtype",
    "ms",
    "baseline_impl",
    "baseline_ms",
    "ratio_to_baseline",
    "tflops",
    "gbps",
    "tokens_per_s",
    "peak_extra_mib",
    "notes",
]


def commit() -> str:
    if os.environ.get("KINDRED_COMMIT"):
        return os.environ["KINDRED_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_flush_buffer: torch.Tensor | None = None


def flush_l2() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        _flush_buffer = torch.empty(2 * l2 // 4 + 1, dtype=torch.int32, device="cuda")
    _flush_buffer.fill_(0x5A5A)


_cycles_per_ms: float | None = None


def _sleep_cycles(ms: float) -> int:
    """GPU clock cycles for torch.cuda._sleep to last about ``ms`` (calibrated once with events)."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(2_000_000)
        end.record()
        end.synchronize()
        _cycles_per_ms = 2_000_000 / max(start.elapsed_time(end), 1e-3)
    return int(ms * _cycles_per_ms)


def host_ms(fn, reps: int = 10) -> float:
    """Median host milliseconds to issue ``fn()`` (Python, dispatch, launches); the device synced between."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return statistics.median(times)


def time_cuda(fn, reps: int = 30, warmup: int = 5, flush: bool = True) -> float:
    """Median device milliseconds of ``fn()`` over ``reps`` runs.

    A device sleep is queued before the start event so the host's launch overhead (Python, op dispatch) hides
    behind it: the events time the device work of ``fn``, not the host. The sleep lasts twice the host time
    of one call (measured after the warm-up), at least 0.3 ms; ``host_ms`` reports the host time itself.
    """
    for _ in range(warmup):
        fn()
    cycles = _sleep_cycles(max(0.3, 2.0 * host_ms(fn, reps=5)))
    times = []
    for _ in range(reps):
        if flush:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def append(family: str, rows: list[dict]) -> Path:
    """Append ``rows`` (dicts keyed by HEADER names; missing cells empty) to results/<family>.csv."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{family}.csv"
    new = not path.exists()
    stamp = datetime.date.today().isoformat()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({"date": stamp, "commit": commit(), "gpu": gpu, "family": family, **row})
    return path


def fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"
