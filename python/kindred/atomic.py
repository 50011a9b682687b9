"""Crash-safe writes into an output folder: whole files and folders appear atomically, durably, and never
through a symbolic link someone planted there.

- ``write_bytes`` / ``write_text``: a new temporary file next to the target (``O_EXCL | O_NOFOLLOW``),
  written, fsynced, renamed over the target (a rename replaces a link at the target itself, not what it
  points to), then the folder fsynced.
- ``temp_folder`` + ``publish_folder``: a folder is filled under a temporary name, every file and subfolder
  fsynced bottom-up, then renamed into place (an existing folder of that name is swapped out atomically with
  ``renameat2(RENAME_EXCHANGE)`` where the file system has it, and removed only after the new one is in).
- ``append_bytes``: appends with ``O_APPEND | O_NOFOLLOW`` (a torn last line is the reader's to tolerate).
- Every ``OSError`` of a write becomes a KindredError naming the folder ("no space left on device" for
  ENOSPC / EDQUOT); the temporary file or folder is removed, so the previous version stays intact.
- Temporary names carry ``<host>.<pid>.<random>``: ``clean_temp`` removes only this process's leftovers and
  those of dead processes on this host, never another live process's work in progress.

Fault hook (tests only): with ``KINDRED_FAULT_KILL=<point>:<n>`` in the environment, the n-th call of
``fault_point("<point>")`` in this process SIGKILLs it. Points: ``step`` (between backward and the
optimizer update), ``checkpoint-files`` (a checkpoint's files written, not yet fsynced or renamed),
``checkpoint-rename`` (the folder renamed, LATEST not yet replaced), ``latest`` (LATEST's temporary file
written and fsynced, not yet renamed), ``metrics`` (half of a metrics.jsonl append written), ``samples``
(half of a samples.jsonl append written).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import socket
from pathlib import Path

from .errors import KindredError

FAULT_ENV = "KINDRED_FAULT_KILL"
_FAULT = os.environ.get(FAULT_ENV, "")
_fault_counts: dict[str, int] = {}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TMP = ".tmp-"
_OLD = ".old-"


def fault_point(name: str) -> None:
    """SIGKILL this process at the n-th call for ``name`` when KINDRED_FAULT_KILL=name:n (see above)."""
    if not _FAULT:
        return
    point, _, count = _FAULT.rpartition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


class WriteError(KindredError):
    """A write into an output folder failed (disk full, I/O error); the message names the folder."""


def write_error(folder: Path, what: str, e: Exception) -> WriteError:
    """The error for a failed write of ``what`` into ``folder``: ``e`` an OSError, or a safetensors error
    (its Rust I/O error comes as text: "IoError(Os { code: 28, kind: StorageFull, ... })")."""
    if isinstance(e, OSError):
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "no space left on device" if full else e.strerror or str(e)
    else:
        full = "StorageFull" in str(e) or f"code: {errno.ENOSPC}," in str(e)
        reason = "no space left on device" if full else str(e)
    return WriteError(f"{folder}: cannot write {what}: {reason}")


def is_write_failure(e: Exception) -> bool:
    """An OSError, a WriteError, or the error safetensors raises when it cannot write its file."""
    return isinstance(e, (OSError, WriteError)) or type(e).__name__ == "SafetensorError"


def refuse_symlink(path: Path) -> Path:
    """``path`` itself, or a KindredError when it is a symbolic link (kindred never writes through one)."""
    if path.is_symlink():
        raise KindredError(
            f"{path} is a symbolic link (to {os.readlink(path)}); kindred does not write through links in an "
            "output folder: remove it or choose another output folder"
        )
    return path


def _tag() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync an existing file (not through a link); an OSError is a WriteError naming its folder."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(Path(path).parent, Path(path).name, e) from e


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (subfolders before their parents), links not followed."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | _NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def write_bytes(path: Path, data: bytes, fault: str | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring); ``fault``: the
    fault point between the temporary file's fsync and the rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{_TMP}{_tag()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):  # clean-up of a path that may be gone
            os.unlink(tmp)
        raise write_error(path.parent, path.name, e) from e
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def append_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    """Append ``data`` to ``path`` (created if absent; a link there is refused by the kernel, ELOOP)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o644)
        try:
            half = len(data) // 2
            _write_all(fd, data[:half])
            if fault:
                fault_point(fault)
            _write_all(fd, data[half:])
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_symlink(path)
        raise write_error(path.parent, path.name, e) from e


def temp_folder(parent: Path, name: str) -> Path:
    """A new empty folder ``parent/.name.tmp-<host>.<pid>.<random>`` to fill before ``publish_folder``."""
    tmp = Path(parent) / f".{name}{_TMP}{_tag()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_error(Path(parent), name, e) from e
    return tmp


def write_folder(final: Path, fill) -> Path:
    """``fill(folder)`` fills a new temporary folder, which then replaces ``final`` (publish_folder). On any
    failure the temporary folder goes; a write failure becomes a WriteError naming ``final``'s folder."""
    final = Path(final)
    tmp = temp_folder(final.parent, final.name)
    try:
        fill(tmp)
    except Exception as e:
        remove_tree(tmp)
        if is_write_failure(e) and not isinstance(e, WriteError):
            raise write_error(final.parent, final.name, e) from e
        raise
    return publish_folder(tmp, final)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_folder(tmp: Path, final: Path) -> Path:
    """fsync ``tmp``'s tree and rename it to ``final``; an existing ``final`` (folder, file or link) is
    replaced only once the new one is in place. On an OSError ``tmp`` is removed and ``final`` left alone."""
    tmp, final = Path(tmp), Path(final)
    try:
        fsync_tree(tmp)
        if not os.path.lexists(final):
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            remove_tree(tmp)  # now the previous version
        else:
            old = final.parent / f".{final.name}{_OLD}{_tag()}"
            os.rename(final, old)
            os.rename(tmp, final)
            remove_tree(old)
        fsync_dir(final.parent)
    except OSError as e:
        remove_tree(tmp)
        raise write_error(final.parent, final.name, e) from e
    return final


def remove_tree(path: Path) -> None:
    """Remove a folder (renamed aside first, so a crash never leaves a half-deleted one under its name),
    a file, or a link (the link only); absent is fine."""
    path = Path(path)
    with contextlib.suppress(OSError):  # clean-up of a path that may be gone
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            trash = path
            if _OLD not in path.name and _TMP not in path.name:
                trash = path.parent / f".{path.name}{_OLD}{_tag()}"
                os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) in a temporary name made by _tag, or None for other names."""
    for marker in (_TMP, _OLD):
        if marker in name:
            host, _, rest = name.rpartition(marker)[2].rpartition(".")[0].rpartition(".")
            try:
                return host, int(rest)
            except ValueError:
                return None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp(folder: Path) -> None:
    """Remove the temporary files and folders in ``folder`` left by this process or by a dead process on
    this host (a killed run's); another live process's, or another host's, are left alone."""
    host, me = socket.gethostname(), os.getpid()
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        owner = _owner(entry.name)
        if owner is not None and owner[0] == host and (owner[1] == me or not _alive(owner[1])):
            remove_tree(entry)
