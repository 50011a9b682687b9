"""The fuzz loop: mutated seed inputs fed to one target in forked workers, failures saved as reproducers.

A worker is forked from the parent (seeds built, libraries imported), caps its address space
(``RLIMIT_AS``), then runs inputs one after the other, each copied first into memory shared with the
parent. The parent watches the worker's execution counter: a worker killed by a signal (a segfault in C++)
or without progress for more than ``hang_s`` of CPU time (or ``WALL_FACTOR`` times that of wall time, for a
worker blocked without using CPU; a hang: it is killed) leaves its current input behind, which the parent
saves. An exception that is not a KindredError (a *foreign* exception) or a MemoryError is saved by the
worker, which goes on. A worker is replaced every ``per_worker`` inputs, so state cannot pile up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import random
import signal
import struct
import tempfile
import time
from pathlib import Path

from .child import WALL_FACTOR, call, cpu_seconds, limit_memory
from .mutate import MAX_SIZE, SEPARATOR, mutate, unpack
from .targets import TARGETS, Target, preload

_HEADER = 40  # u64 executions, input length, foreign count, memory-error count, ready flag
_WARM_UP_S = 120.0  # a worker's first (warm-up) run imports and builds caches


@dataclasses.dataclass
class Stats:
    target: str
    executions: int = 0
    seconds: float = 0.0
    crashes: int = 0
    hangs: int = 0
    foreign: int = 0
    memory: int = 0
    saved: list = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.crashes + self.hangs + self.foreign + self.memory

    def line(self) -> str:
        rate = self.executions / self.seconds if self.seconds else 0.0
        return (
            f"{self.target:15s} {self.executions:9,d} execs {rate:8.1f}/s  crashes {self.crashes}  hangs "
            f"{self.hangs}  foreign {self.foreign}  memory {self.memory}"
        )


def _mutated(rng: random.Random, target: Target, seeds: list[bytes]) -> bytes:
    seed = rng.choice(seeds)
    if target.parts == 1:
        return mutate(rng, seed, seeds, target.kind)
    parts = unpack(seed, target.parts, [])
    i = rng.randrange(target.parts)
    parts[i] = mutate(rng, parts[i], [unpack(s, target.parts, [])[i] for s in seeds], target.kind_of(i))
    return SEPARATOR.join(parts)


def _save(out: Path, target: str, data: bytes, why: str, detail: str) -> Path:
    digest = hashlib.sha1(data).hexdigest()[:12]
    folder = out / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{why}-{digest}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(detail)
    return path


def _worker(
    target: Target, seeds: list[bytes], shared: mmap.mmap, seed: int, count: int, memory: int, out: Path
):
    work = Path(
        tempfile.mkdtemp(
            prefix=f"kindred-fuzz-{target.name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
    )
    limit_memory(memory)
    call(target.run, seeds[0], work)  # warm-up: lazy imports, cached base model
    shared[32:40] = struct.pack("<Q", 1)
    rng = random.Random(seed)
    for n in range(count):
        data = _mutated(rng, target, seeds)
        shared[8:16] = struct.pack("<Q", len(data))
        shared[_HEADER : _HEADER + len(data)] = data
        result = call(target.run, data, work)
        if result.kind in ("foreign", "memory"):
            _save(out, target.name, data, result.kind, result.detail)
            slot = 16 if result.kind == "foreign" else 24
            shared[slot : slot + 8] = struct.pack("<Q", struct.unpack_from("<Q", shared, slot)[0] + 1)
        shared[0:8] = struct.pack("<Q", n + 1)


def fuzz(
    name: str,
    seconds: float,
    out: Path,
    seeds: list[bytes],
    *,
    seed: int = 0,
    hang_s: float = 2.0,
    per_worker: int = 2000,
    memory: int = 2 << 30,
    log=None,
) -> Stats:
    """Fuzz target ``name`` for ``seconds``; reproducers of failures go under ``out/name``."""
    target = TARGETS[name]
    stats = Stats(name)
    preload()
    shared = mmap.mmap(-1, _HEADER + MAX_SIZE)
    start = time.monotonic()
    worker_seed = seed
    while time.monotonic() - start < seconds:
        shared[0:_HEADER] = bytes(_HEADER)
        worker_seed += 1
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(target, seeds, shared, worker_seed, per_worker, memory, out)
            except BaseException:  # the harness itself failed: report it as an exit status
                code = 3
            finally:
                os._exit(code)
        last, last_change, cpu_at_change, was_ready = 0, time.monotonic(), 0.0, False
        status = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.monotonic()
            executed = struct.unpack_from("<Q", shared, 0)[0]
            ready = struct.unpack_from("<Q", shared, 32)[0]
            limit = hang_s if ready else _WARM_UP_S  # the warm-up counts from the fork
            cpu = cpu_seconds(pid)
            if ready and not was_ready:  # the warm-up is over: time the inputs from here
                was_ready, last_change, cpu_at_change = True, now, cpu
            if executed != last:
                last, last_change, cpu_at_change = executed, now, cpu
            elif cpu - cpu_at_change > limit or now - last_change > limit * WALL_FACTOR:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "hang"
                break
            if now - start > seconds + hang_s:  # out of time: stop the worker between inputs
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "stopped"
                break
            time.sleep(0.01)
        executed = struct.unpack_from("<Q", shared, 0)[0]
        stats.foreign += struct.unpack_from("<Q", shared, 16)[0]
        stats.memory += struct.unpack_from("<Q", shared, 24)[0]
        stats.executions += executed
        length = struct.unpack_from("<Q", shared, 8)[0]
        current = bytes(shared[_HEADER : _HEADER + length])
        if status == "hang":
            stats.hangs += 1
            stats.saved.append(_save(out, name, current, "hang", f"no progress for {hang_s} s of CPU"))
        elif status != "stopped" and os.WIFSIGNALED(status):
            stats.crashes += 1
            sig = os.WTERMSIG(status)
            stats.saved.append(_save(out, name, current, "crash", f"killed by signal {sig}"))
        elif status != "stopped" and os.WEXITSTATUS(status) != 0:
            raise RuntimeError(f"the fuzz worker of {name} failed (exit status {os.WEXITSTATUS(status)})")
        if log:
            log(f"  {name}: {stats.executions:,} executions")
    stats.seconds = time.monotonic() - start
    shared.close()
    return stats
