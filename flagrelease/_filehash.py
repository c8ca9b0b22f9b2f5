"""File checksums for the manifest and for publishing, with a small on-disk cache.

Weights can be hundreds of gigabytes; the cache keys a file's sha256 by its resolved
path, size and modification time, so the card and publish stages hash each file once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from flagrelease._atomic import atomic_write_json

__all__ = ["FileEntry", "HashCache", "git_blob_sha1", "sha256_file", "walk_files"]

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what a hub reports for files stored without LFS)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file to record or publish.

    Attributes:
        path: the path relative to its root, with ``/`` separators.
        local: the absolute local path.
        size: bytes.
        sha256: hex digest of the content.
    """

    path: str
    local: Path
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        """The entry as the manifest records it."""
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class HashCache:
    """sha256 of files keyed by (resolved path, size, mtime); persisted as JSON when given a path."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, list[object]] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self._data = {str(k): v for k, v in loaded.items() if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError):
                self._data = {}

    def sha256(self, file: Path) -> str:
        """The sha256 of ``file``, from the cache when its size and mtime are unchanged."""
        resolved = file.resolve()
        st = resolved.stat()
        key = str(resolved)
        with self._lock:
            hit = self._data.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        digest = sha256_file(resolved)
        with self._lock:
            self._data[key] = [st.st_size, st.st_mtime_ns, digest]
            self._dirty = True
        return digest

    def remember(self, file: Path, digest: str) -> None:
        """Record a digest computed elsewhere (e.g. a fetch manifest) for ``file`` as it is now."""
        resolved = file.resolve()
        st = resolved.stat()
        with self._lock:
            self._data[str(resolved)] = [st.st_size, st.st_mtime_ns, digest]
            self._dirty = True

    def save(self) -> None:
        """Write the cache if it changed and has a path."""
        if self.path is not None and self._dirty:
            with self._lock:
                data = dict(self._data)
                self._dirty = False
            atomic_write_json(self.path, data, indent=0)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def walk_files(
    root: Path,
    *,
    cache: HashCache | None = None,
    exclude: frozenset[str] = frozenset(),
    links_outside: bool = False,
) -> list[FileEntry]:
    """Every regular file below ``root`` (hidden names and temporary files skipped), sorted.

    Args:
        root: the folder to walk.
        cache: a hash cache to reuse digests from.
        exclude: relative paths (with ``/``) to leave out.
        links_outside: follow symbolic links that leave ``root`` (a hub cache snapshot
            links its files to blobs elsewhere); otherwise such links are skipped.
    """
    root = root.resolve()
    out: list[FileEntry] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root)
            rel_s = rel.as_posix()
            if _hidden(rel) or name.endswith(".incomplete") or rel_s in exclude:
                continue
            real = full.resolve()
            if not real.is_file() or (full.is_symlink() and not links_outside and not real.is_relative_to(root)):
                continue
            digest = cache.sha256(real) if cache else sha256_file(real)
            out.append(FileEntry(rel_s, real, real.stat().st_size, digest))
    out.sort(key=lambda e: e.path)
    return out
