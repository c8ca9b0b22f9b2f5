"""Where the fetch stage gets files from: the common shape of a source, and a local folder.

Each source lists the files of one pinned revision (with the sizes and checksums the hub
publishes) and transfers one file at a time into a partial file that it resumes when a
previous run left one behind.  Verification and placement are the caller's job
(:mod:`flagrelease.fetch._fetch`).  The hubs are in :mod:`flagrelease.fetch._hub`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flagrelease.config import ModelSection, ModelSource
from flagrelease.errors import FetchError

__all__ = [
    "MAX_FILE_BYTES",
    "ByteSink",
    "Cancelled",
    "Listing",
    "LocalSource",
    "RemoteFile",
    "Source",
    "disk_error",
    "listed_file",
    "make_source",
    "start_part",
]

#: Adds ``n`` bytes (negative when a transfer restarts) to the running total of one file.
ByteSink = Callable[[int], None]
#: No single file of a model is larger than this (1 PiB); a bigger size is a broken listing.
MAX_FILE_BYTES = 1 << 50

_COPY_CHUNK = 8 << 20


class Cancelled(BaseException):
    """The fetch was interrupted; transfers stop at their next chunk and keep their partial files.

    A ``BaseException`` so that hub clients, which retry on ``Exception``, let it through.
    """


@dataclass(frozen=True)
class RemoteFile:
    """One file of the revision being fetched.

    Attributes:
        path: relative path with ``/`` separators, checked by :func:`~flagrelease.fetch._names.safe_relpath`.
        size: size in bytes, as the source lists it.
        sha256: the content sha256 the hub publishes (LFS oid, ModelScope ``Sha256``), if any.
        git_sha1: the git blob id the hub publishes for files stored without LFS, if any.
        local: the file to copy, for a local source.
        mtime_ns: the local file's modification time, for a local source.
    """

    path: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None
    local: Path | None = None
    mtime_ns: int | None = None


def listed_file(path: object, size: object, *, where: str, repo_id: str | None = None, **kw: object) -> RemoteFile:
    """A :class:`RemoteFile` from a listing's raw values, checked for type and range.

    Raises:
        FetchError: the path is not a string, or the size is not a whole number of bytes
            between 0 and :data:`MAX_FILE_BYTES`.
    """
    if not isinstance(path, str):
        raise FetchError(
            f"{where}: lists a file whose name is {path!r} ({type(path).__name__}), not a string; the listing is "
            "malformed: check the repo id and revision",
            model=repo_id,
        )
    if isinstance(size, bool) or not isinstance(size, int | str):
        bad: int | None = None
    else:
        try:
            bad = int(size)
        except ValueError:
            bad = None
    if bad is None or not 0 <= bad <= MAX_FILE_BYTES:
        raise FetchError(
            f"{where}: lists {path!r} with size {size!r}, not a byte count between 0 and {MAX_FILE_BYTES}; the "
            "listing is malformed: check the repo id and revision, or leave the file out with model.ignore_patterns",
            model=repo_id,
        )
    return RemoteFile(path=path, size=bad, **kw)  # type: ignore[arg-type]


@dataclass
class Listing:
    """The files of one revision and the commit it resolved to."""

    revision: str | None
    files: list[RemoteFile] = field(default_factory=list)


class Source(Protocol):
    """A place files come from."""

    kind: str
    repo_id: str
    requested_revision: str | None
    endpoint: str | None

    def where(self) -> str:
        """Where the files come from, for messages (no credentials)."""
        ...

    def list_files(self) -> Listing:
        """List the revision's files (network for hubs)."""
        ...

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        """Transfer ``rf`` into ``part`` (resuming unless ``fresh``) and return the finished file."""
        ...


def start_part(part: Path, size: int, *, fresh: bool) -> int:
    """Prepare the partial file and return how many bytes it already holds."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        part.unlink(missing_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > size:  # longer than the file, so not a prefix of it
        part.unlink()
        have = 0
    return have


def disk_error(err: OSError, where: Path) -> FetchError:
    """A FetchError for a failed write of ``where``, with the fix."""
    hint = "free some disk space" if err.errno == errno.ENOSPC else "check the folder's permissions"
    return FetchError(f"cannot write {where}: {err.strerror or err}; {hint} and fetch again (it resumes)")


class LocalSource:
    """A folder on this machine, copied like a hub download (same manifest and checks).

    Symbolic links that point outside the folder, link loops and links to folders are
    refused; copy the files into a plain folder first (``cp -rL``).
    """

    kind = "local"

    def __init__(self, model: ModelSection) -> None:
        assert model.path is not None  # the config guarantees it for source: local
        self.repo_id = model.repo_id
        self.requested_revision = model.revision
        self.root = Path(model.path).expanduser()
        self.endpoint: str | None = None

    def where(self) -> str:
        return str(self.root)

    def _refuse(self, full: Path, why: str) -> FetchError:
        return FetchError(
            f"{full} {why}; copy the model into a plain folder (cp -rL) and point model.path at it",
            model=self.repo_id,
        )

    def list_files(self) -> Listing:
        try:
            root = self.root.resolve()
        except (OSError, RuntimeError) as err:
            raise self._refuse(self.root, f"cannot be resolved ({err})") from err
        if not root.is_dir():
            raise FetchError(
                f"local model folder {self.root} does not exist; set model.path to a folder with the "
                "weights (or model.generate: tiny-qwen2 for the demo model)",
                model=self.repo_id,
            )
        files: list[RemoteFile] = []

        def walk_error(err: OSError) -> None:
            raise self._refuse(Path(err.filename or root), f"cannot be listed ({err.strerror or err})") from err

        for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=walk_error):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                full = here / d
                if d.startswith("."):
                    continue
                if full.is_symlink():
                    raise self._refuse(full, "is a symbolic link to a folder")
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                full = here / name
                rel = full.relative_to(root).as_posix()
                if name.startswith(".") or name.endswith((".incomplete", ".part", ".lock")):
                    continue
                try:
                    real = full.resolve(strict=True)
                except RuntimeError as err:  # Python < 3.13 reports a link loop this way
                    raise self._refuse(full, f"is a symbolic link loop ({err})") from err
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        raise self._refuse(full, "is a symbolic link loop") from err
                    continue  # a dangling link: nothing to copy
                if full.is_symlink() and not real.is_relative_to(root):
                    raise self._refuse(full, f"links to {real}, outside {root}")
                if not real.is_file():
                    continue
                st = real.stat()
                files.append(RemoteFile(path=rel, size=st.st_size, local=real, mtime_ns=st.st_mtime_ns))
        return Listing(revision=self.requested_revision, files=files)

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        assert rf.local is not None
        start_part(part, rf.size, fresh=True)
        try:
            with open(rf.local, "rb") as src, open(part, "wb") as out:
                while block := src.read(_COPY_CHUNK):
                    out.write(block)
                    sink(len(block))
            shutil.copystat(rf.local, part)
        except OSError as err:
            raise disk_error(err, part) from err
        return part


def make_source(model: ModelSection) -> Source:
    """The source adapter for ``model.source``."""
    from flagrelease.fetch._hub import HfSource, ModelScopeSource

    if model.source is ModelSource.HF:
        return HfSource(model)
    if model.source is ModelSource.MODELSCOPE:
        return ModelScopeSource(model)
    return LocalSource(model)
