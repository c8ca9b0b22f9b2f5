"""Atomic writes: a temporary name in the same folder, fsync, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_copy",
    "atomic_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "replace_dir",
]


#: The process's umask, read once (reading it means setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".incomplete", dir=path.parent)
    # mkstemp makes 0600 files; what we write is read by others too (a container's user, a
    # downloader of a published folder), so it gets the mode a plain open() would give.
    os.fchmod(fd, 0o666 & ~_UMASK)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as sorted, indented JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"
    return atomic_write_text(path, text)


def atomic_copy(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` through a temporary name."""
    with atomic_open(dst, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, length=16 << 20)
    shutil.copystat(src, dst)
    return Path(dst)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only on success.

    An existing ``path`` is removed only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".incomplete", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; this one becomes a normal folder
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Put the finished folder ``src`` at ``dst`` (same file system), then fsync the parent.

    An existing ``dst`` is moved aside first and removed only once ``src`` is in place.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
