"""File names from a hub or a local listing: checked before anything is written.

A listing is data from outside (a hub, a folder someone else filled): every name must be
a clean relative POSIX path that stays inside the destination, and the listing as a whole
must describe a tree that can exist on disk (no file that is also a folder, no name a
file system refuses).  Anything else is a :class:`~flagrelease.errors.FetchError` that
names the file, never a traceback.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from flagrelease._redact import redact
from flagrelease.errors import FetchError

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "RESERVED_NAMES",
    "check_tree",
    "clean_endpoint",
    "safe_relpath",
    "tree_digest",
]

#: Names the fetch stage keeps for itself at the top of the destination folder.
RESERVED_NAMES = frozenset({"fetch_manifest.json", ".flagrelease-fetch", ".flagrelease-fetch.lock"})
#: The longest path component Linux file systems take (bytes, UTF-8).
MAX_NAME_BYTES = 255
#: The longest relative path accepted (bytes); a partial file's name adds ``.part`` to it.
MAX_PATH_BYTES = 1024


def _refusal(name: object, dest: Path, why: str) -> FetchError:
    return FetchError(
        f"refusing hub file name {name!r}: {why}; it would be written outside {dest} or cannot be written at all. "
        "The repository is malformed or hostile: check the repo id and revision, or leave the "
        "file out with model.ignore_patterns"
    )


def safe_relpath(name: str, dest: Path) -> str:
    """Check that a file name from a hub stays inside ``dest`` and return it normalised.

    Args:
        name: the name as the hub lists it.
        dest: the (resolved) destination folder.

    Returns:
        The name, unchanged (it is already a clean relative POSIX path).

    Raises:
        FetchError: the name is not a string, is absolute, climbs out with ``..``, contains
            a backslash or control characters, is longer than a file system takes,
            collides with the stage's own files, or would be written through a symbolic link.
    """
    if not isinstance(name, str):
        raise _refusal(name, dest, f"is a {type(name).__name__}, not a string")

    def bad(why: str) -> FetchError:
        return _refusal(name, dest, why)

    if not name or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise bad("empty or contains control characters")
    if "\\" in name:
        raise bad("contains a backslash")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise bad("is an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("has an empty, '.' or '..' component")
    if parts[0] in RESERVED_NAMES:
        raise bad("collides with a file the fetch stage writes itself")
    try:
        encoded = [p.encode("utf-8") for p in parts]
    except UnicodeEncodeError:
        raise bad("is not valid UTF-8") from None
    longest = max(len(p) for p in encoded)
    if longest > MAX_NAME_BYTES - len(".part"):
        raise bad(f"has a component of {longest} bytes; file systems take at most {MAX_NAME_BYTES}")
    if len(name.encode("utf-8")) > MAX_PATH_BYTES:
        raise bad(f"is longer than {MAX_PATH_BYTES} bytes")
    target = dest
    for part in parts:
        target = target / part
        if target.is_symlink():
            raise bad(f"{target} is a symbolic link")
    try:
        inside = target.resolve().is_relative_to(dest.resolve())
    except (OSError, RuntimeError) as err:  # a symlink loop on the way
        raise bad(f"cannot be resolved ({err})") from err
    if not inside:
        raise bad("resolves outside the destination")
    return str(PurePosixPath(*parts))


def check_tree(names: Iterable[str], *, where: str, repo_id: str | None = None) -> None:
    """Check that ``names`` can all exist at once: no file is also a folder of another.

    Raises:
        FetchError: a name is both a file and the folder of another file (``a`` and ``a/b``).
    """
    files = set(names)
    for name in sorted(files):
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in files:
                raise FetchError(
                    f"{where}: lists {folder!r} as a file and {name!r} inside it as a folder; the listing is "
                    "malformed. Leave one of them out with model.ignore_patterns",
                    model=repo_id,
                )


def clean_endpoint(url: str | None) -> str | None:
    """``url`` without user info, query or fragment (what a manifest may record)."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return redact(urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", "")))


def tree_digest(entries: list[tuple[str, str]]) -> str:
    """A content address for a set of (path, sha256) pairs (used as a local source's revision)."""
    h = hashlib.sha256()
    for path, digest in sorted(entries):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()
