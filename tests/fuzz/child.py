"""Running a reader in a forked child: a segfault, a hang or runaway memory is an outcome, not a dead test.

The child gets an address-space limit (``RLIMIT_AS``: its current size plus ``memory`` bytes) and is killed
once it has used ``timeout`` seconds of CPU (CPU time, not wall time: on a loaded machine a niced child may
wait seconds for a core; a child blocked without using CPU is killed after ``WALL_FACTOR`` times as long of
wall time); it reports back how the call ended: returned, a KindredError, another exception (a *foreign*
one: the failure the suite exists to find), or a MemoryError.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import resource
import signal
import sys
import time
import traceback

MEMORY = 2 << 30
WALL_FACTOR = 20
_TICK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Outcome:
    kind: str  # "ok" | "kindred" | "foreign" | "memory" | "crash" | "hang"
    detail: str = ""
    seconds: float = 0.0  # CPU time of the child

    @property
    def failed(self) -> bool:
        return self.kind in ("foreign", "memory", "crash", "hang")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)


def virtual_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def limit_memory(extra: int) -> None:
    """Cap this forked process's address space at its current size plus ``extra`` bytes, and keep torch
    on one thread (an OpenMP pool the parent started does not survive the fork: using it hangs)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    cap = virtual_size() + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def classify(exc: BaseException) -> Outcome:
    from kindred.errors import KindredError

    if isinstance(exc, KindredError):
        return Outcome("kindred", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, MemoryError):
        return Outcome("memory", "MemoryError")
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return Outcome("foreign", f"{type(exc).__name__}: {exc}\n{tb}")


def call(fn, *args) -> Outcome:
    """fn(*args) in this process, classified."""
    try:
        fn(*args)
    except BaseException as e:  # every exception is an outcome here
        if isinstance(e, KeyboardInterrupt):
            raise
        return classify(e)
    return Outcome("ok")


def run_in_child(fn, *args, timeout: float = 5.0, memory: int = MEMORY) -> Outcome:
    """fn(*args) in a forked child under a time and memory limit; how it ended."""
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        os.close(read_fd)
        try:
            limit_memory(memory)
            out = call(fn, *args)
            os.write(write_fd, pickle.dumps((out.kind, out.detail[:4000])))
        finally:
            os._exit(0)
    os.close(write_fd)
    status, cpu = None, 0.0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            cpu = usage.ru_utime + usage.ru_stime
            break
        cpu = cpu_seconds(pid)
        if cpu > timeout or time.monotonic() - start > timeout * WALL_FACTOR:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return Outcome("hang", f"no answer after {cpu:.1f} s of CPU", cpu)
        time.sleep(0.005)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    seconds = cpu
    if os.WIFSIGNALED(status):
        return Outcome("crash", f"killed by signal {os.WTERMSIG(status)}", seconds)
    if not data:
        return Outcome(
            "crash", f"exited with status {os.waitstatus_to_exitcode(status)} and no report", seconds
        )
    kind, detail = pickle.loads(data)
    return Outcome(kind, detail, seconds)
