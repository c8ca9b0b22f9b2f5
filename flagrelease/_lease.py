"""Locks that say who holds them: one run per release, one server per port, runtimes in use.

Each lock is an advisory ``flock`` on a file, taken without waiting: the kernel drops it
when its process dies, however it died, so a lock is never stale.  An exclusive holder
writes who it is (pid, command line, start time) into the lock file, and a process that
finds the lock taken refuses at once with a :class:`~flagrelease.errors.BusyError`
naming that holder.

- :func:`release_lock`: the work folder of a release (one run of it at a time).  Taken
  again by the same process it nests (the flow holds it while its tasks run).
- :func:`port_lease`: a serving port, machine-wide.
- :func:`shared_lock` / :func:`exclusive_lock`: readers and a remover of one thing (a
  serving runtime is in use while any server runs from it, and is removed only when none does).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flagrelease._supervise import state_dir
from flagrelease.errors import BusyError

__all__ = ["LOCK_NAME", "exclusive_lock", "holder", "port_lease", "release_lock", "shared_lock"]

#: The lock file in a release's work folder.
LOCK_NAME = ".flagrelease-run.lock"

_held: dict[Path, tuple[int, int]] = {}  # path -> (fd, depth), this process's nested locks
_guard = threading.Lock()


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "command": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder(path: Path) -> dict[str, Any] | None:
    """Who holds the exclusive lock at ``path``, as it wrote it (pid, command, since), if known."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} ({info.get('command') or '?'}, since {info.get('since') or '?'})"


def _take(path: Path, flags: int) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, flags | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_holder(fd: int) -> None:
    data = json.dumps(_me()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextlib.contextmanager
def exclusive_lock(path: Path, *, what: str, fix: str) -> Iterator[None]:
    """Hold ``path`` exclusively, or refuse at once naming the holder.

    Nested use in one process is allowed (the depth is counted).

    Args:
        path: the lock file.
        what: what it guards, for the message (``release demo-tiny-cpu``).
        fix: what to do when it is taken.

    Raises:
        BusyError: another process holds it (or holds it shared).
    """
    path = Path(path).resolve()
    with _guard:
        if path in _held:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
            nested = True
        else:
            nested = False
    if not nested:
        fd_or_none = _take(path, fcntl.LOCK_EX)
        if fd_or_none is None:
            raise BusyError(f"{what} is in use by {_describe(holder(path))}; {fix}")
        fd = fd_or_none
        _write_holder(fd)
        with _guard:
            _held[path] = (fd, 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[path]
            if depth > 1:
                _held[path] = (fd, depth - 1)
            else:
                del _held[path]
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # closing drops the lock


@contextlib.contextmanager
def shared_lock(path: Path, *, what: str, fix: str) -> Iterator[None]:
    """Hold ``path`` shared (many readers at once), or refuse while someone holds it exclusively.

    Raises:
        BusyError: a process holds it exclusively.
    """
    fd = _take(Path(path), fcntl.LOCK_SH)
    if fd is None:
        raise BusyError(f"{what} is being changed by {_describe(holder(path))}; {fix}")
    try:
        yield
    finally:
        os.close(fd)


def release_lock(root: Path, *, release: str) -> contextlib.AbstractContextManager[None]:
    """One run of a release at a time: the lock on its work folder ``root``.

    Raises:
        BusyError: another process runs this release (the message names it).
    """
    return exclusive_lock(
        Path(root) / LOCK_NAME,
        what=f"release {release!r} (work folder {root})",
        fix="wait for that run to finish or stop it; two runs of one release would overwrite each other's files",
    )


def port_lease(port: int, *, what: str) -> contextlib.AbstractContextManager[None]:
    """Hold serving port ``port`` for this process, machine-wide, while a server uses it.

    Raises:
        BusyError: another flagrelease process serves on that port (the message names it).
    """
    return exclusive_lock(
        state_dir() / "ports" / f"{int(port)}.lock",
        what=f"port {port}",
        fix=f"{what} cannot serve there: wait for it, stop it, or choose another port (serve.engine_args.port)",
    )
