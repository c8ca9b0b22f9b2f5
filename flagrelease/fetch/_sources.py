"""Where the fetch stage gets files from: the HF Hub, ModelScope, or a local folder.

Each source lists the files of one pinned revision (with the sizes and checksums the hub
publishes) and transfers one file at a time into a partial file that it resumes when a
previous run left one behind.  Verification and placement are the caller's job
(:mod:`flagrelease.fetch`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from flagrelease import constants
from flagrelease._redact import redact
from flagrelease.config import ModelSection, ModelSource
from flagrelease.errors import FetchError

__all__ = [
    "RESERVED_NAMES",
    "ByteSink",
    "Cancelled",
    "HfSource",
    "Listing",
    "LocalSource",
    "ModelScopeSource",
    "RemoteFile",
    "Source",
    "clean_endpoint",
    "make_source",
    "safe_relpath",
    "tree_digest",
]

log = logging.getLogger("flagrelease.fetch")

#: Names the fetch stage keeps for itself at the top of the destination folder.
RESERVED_NAMES = frozenset({"fetch_manifest.json", ".flagrelease-fetch", ".flagrelease-fetch.lock"})

#: Adds ``n`` bytes (negative when a transfer restarts) to the running total of one file.
ByteSink = Callable[[int], None]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_COPY_CHUNK = 8 << 20


class Cancelled(BaseException):
    """The fetch was interrupted; transfers stop at their next chunk and keep their partial files.

    A ``BaseException`` so that hub clients, which retry on ``Exception``, let it through.
    """


@dataclass(frozen=True)
class RemoteFile:
    """One file of the revision being fetched.

    Attributes:
        path: relative path with ``/`` separators, checked by :func:`safe_relpath`.
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


# -- names -------------------------------------------------------------------------------
def safe_relpath(name: str, dest: Path) -> str:
    """Check that a file name from a hub stays inside ``dest`` and return it normalised.

    Args:
        name: the name as the hub lists it.
        dest: the (resolved) destination folder.

    Returns:
        The name, unchanged (it is already a clean relative POSIX path).

    Raises:
        FetchError: the name is absolute, climbs out with ``..``, contains a backslash or
            control characters, collides with the stage's own files, or would be written
            through a symbolic link.
    """

    def bad(why: str) -> FetchError:
        return FetchError(
            f"refusing hub file name {name!r}: {why}; it would be written outside {dest}. "
            "The repository is malformed or hostile: check the repo id and revision, or leave the "
            "file out with model.ignore_patterns"
        )

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
    target = dest
    for part in parts:
        target = target / part
        if target.is_symlink():
            raise bad(f"{target} is a symbolic link")
    if not target.resolve().is_relative_to(dest.resolve()):
        raise bad("resolves outside the destination")
    return str(PurePosixPath(*parts))


def clean_endpoint(url: str | None) -> str | None:
    """``url`` without user info, query or fragment (what a manifest may record)."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return redact(urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", "")))


def _check_digest(value: Any, pattern: re.Pattern[str]) -> str | None:
    text = str(value).lower() if value else ""
    return text if pattern.match(text) else None


def _sink_bar(sink: ByteSink) -> type:
    """A progress-bar class for hub clients that forwards every update to ``sink``."""

    class _SinkBar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = 0

        def update(self, n: int | float = 1) -> None:
            self.n += int(n)
            sink(int(n))

        def close(self) -> None:
            return None

        def __enter__(self) -> _SinkBar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    return _SinkBar


def _start_part(part: Path, size: int, *, fresh: bool) -> int:
    """Prepare the partial file and return how many bytes it already holds."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        part.unlink(missing_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > size:  # longer than the file, so not a prefix of it
        part.unlink()
        have = 0
    return have


def _disk_error(err: OSError, where: Path) -> FetchError:
    hint = "free some disk space" if err.errno == errno.ENOSPC else "check the folder's permissions"
    return FetchError(f"cannot write {where}: {err.strerror or err}; {hint} and fetch again (it resumes)")


# -- Hugging Face Hub -------------------------------------------------------------------
class HfSource:
    """The Hugging Face Hub (or a mirror at ``HF_ENDPOINT``), through ``huggingface_hub``.

    Files are listed with ``HfApi.list_repo_tree`` at the resolved commit and transferred
    with ``huggingface_hub.file_download.http_get`` into a partial file of our own, so that
    an interrupted run resumes with an HTTP range request (``hf_hub_download`` keeps no
    partial file across processes).
    """

    kind = "hf"

    def __init__(self, model: ModelSection) -> None:
        self.repo_id = model.repo_id
        self.requested_revision = model.revision
        self._endpoint = constants.hf_endpoint()
        self.endpoint = clean_endpoint(self._endpoint)
        self._token = constants.hf_token()
        self._commit: str | None = None

    def where(self) -> str:
        return f"{self.endpoint}/{self.repo_id}@{self._commit or self.requested_revision}"

    def _advice(self, err: Exception) -> FetchError:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        what = redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
        if isinstance(err, GatedRepoError):
            hint = "accept the model's licence on its hub page and set HF_TOKEN to a token of that account"
        elif isinstance(err, RepositoryNotFoundError):
            hint = "check model.repo_id; for a private repo set HF_TOKEN"
        elif isinstance(err, RevisionNotFoundError):
            hint = "check model.revision (a commit sha from the repo's history, or a tag)"
        else:
            hint = f"check that {self.endpoint} is reachable (HF_ENDPOINT) and fetch again; it resumes"
        return FetchError(f"{self.where()}: {what}; {hint}", model=self.repo_id)

    def _transport_errors(self) -> tuple[type[BaseException], ...]:
        from huggingface_hub.errors import HfHubHTTPError

        found: list[type[BaseException]] = [HfHubHTTPError]
        for mod_name in ("httpx2", "httpx"):
            try:
                found.append(importlib.import_module(mod_name).HTTPError)
            except (ImportError, AttributeError):
                continue
        return tuple(found)

    def list_files(self) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self._endpoint, token=self._token)
        try:
            info = api.model_info(self.repo_id, revision=self.requested_revision)
            self._commit = info.sha or self.requested_revision
            entries = list(api.list_repo_tree(self.repo_id, revision=self._commit, recursive=True))
        except self._transport_errors() as err:
            raise self._advice(err) from err  # type: ignore[arg-type]
        files: list[RemoteFile] = []
        for e in entries:
            if not isinstance(e, RepoFile):
                continue
            lfs_sha = _check_digest(e.lfs.sha256, _SHA256) if e.lfs is not None else None
            git_sha1 = None if e.lfs is not None else _check_digest(e.blob_id, _SHA1)
            files.append(RemoteFile(path=e.path, size=int(e.size), sha256=lfs_sha, git_sha1=git_sha1))
        return Listing(revision=self._commit, files=files)

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        have = _start_part(part, rf.size, fresh=fresh)
        sink(have)
        url = hf_hub_url(
            self.repo_id, rf.path, revision=self._commit or self.requested_revision, endpoint=self._endpoint
        )
        headers = build_hf_headers(token=self._token, library_name="flagrelease")
        try:
            with open(part, "ab") as fh:
                http_get(
                    url,
                    fh,
                    resume_size=have,
                    headers=headers,
                    expected_size=rf.size,
                    displayed_filename=rf.path,
                    tqdm_class=_sink_bar(sink),
                )
        except self._transport_errors() as err:
            raise self._advice(err) from err  # type: ignore[arg-type]
        except OSError as err:
            if err.errno is not None:
                raise _disk_error(err, part) from err
            # http_get's own size check; verification reports it and downloads again.
            log.warning("%s: %s", rf.path, redact(str(err).splitlines()[0]))
        except ValueError as err:  # e.g. a file beyond plain-HTTP size limits
            raise FetchError(f"{self.where()}: {rf.path}: {redact(str(err))}", model=self.repo_id) from err
        return part


# -- ModelScope ---------------------------------------------------------------------------
class ModelScopeSource:
    """ModelScope (or ``MODELSCOPE_ENDPOINT``), through the ``modelscope`` client.

    Files are listed with ``HubApi.list_repo_files`` (which carries each file's
    ``Sha256``) and transferred with ``modelscope.hub.file_download.http_get_model_file``,
    which resumes a partial file with a range request.
    """

    kind = "modelscope"

    def __init__(self, model: ModelSection) -> None:
        self.repo_id = model.repo_id
        self.requested_revision = model.revision
        self._endpoint = constants.modelscope_endpoint()
        self.endpoint = clean_endpoint(self._endpoint)
        self._token = constants.modelscope_token()

    def where(self) -> str:
        return f"{self.endpoint}/models/{self.repo_id}@{self.requested_revision}"

    def _fail(self, err: BaseException, hint: str) -> FetchError:
        what = redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return FetchError(f"{self.where()}: {what}; {hint}", model=self.repo_id)

    def list_files(self) -> Listing:
        import requests
        from modelscope.hub.api import HubApi
        from modelscope_hub.errors import HubError

        api = HubApi(endpoint=self._endpoint, token=self._token)
        try:
            infos = api.list_repo_files(self.repo_id, "model", revision=self.requested_revision, recursive=True)
        except (HubError, requests.RequestException) as err:
            raise self._fail(
                err,
                "check model.repo_id and model.revision, MODELSCOPE_ENDPOINT, and for a private repo "
                "MODELSCOPE_API_TOKEN",
            ) from err
        files: list[RemoteFile] = []
        for info in infos:
            kind = str(getattr(info, "type", "blob") or "blob").lower()
            if kind in ("tree", "dir", "directory"):
                continue
            if kind not in ("blob", "file"):
                raise FetchError(
                    f"{self.where()}: {info.path!r} is a {kind}, not a regular file; refusing to fetch it "
                    "(leave it out with model.ignore_patterns)",
                    model=self.repo_id,
                )
            files.append(
                RemoteFile(
                    path=str(info.path),
                    size=int(info.size or 0),
                    sha256=_check_digest(getattr(info, "sha256", None), _SHA256),
                )
            )
        return Listing(revision=self.requested_revision, files=files)

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        import requests
        import urllib3
        from modelscope.hub.callback import ProgressCallback
        from modelscope.hub.file_download import get_file_download_url, http_get_model_file

        _start_part(part, rf.size, fresh=fresh)

        class _Sink(ProgressCallback):
            def update(self, size: int) -> None:
                sink(size)

            def end(self) -> None:
                return None

        url = get_file_download_url(self.repo_id, rf.path, self.requested_revision or "master", endpoint=self._endpoint)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        cookies = {"m_session_id": self._token} if self._token else None
        try:
            http_get_model_file(
                url,
                str(part.parent),
                part.name,
                rf.size,
                cookies,
                headers=headers,
                disable_tqdm=True,
                progress_callbacks=[_Sink],
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            raise self._fail(err, f"check that {self.endpoint} is reachable and fetch again; it resumes") from err
        except OSError as err:
            raise _disk_error(err, part) from err
        return part


# -- a local folder -------------------------------------------------------------------------
class LocalSource:
    """A folder on this machine, copied like a hub download (same manifest and checks).

    Symbolic links that point outside the folder are refused; copy the files into a
    plain folder first (``cp -rL``).
    """

    kind = "local"

    def __init__(self, model: ModelSection) -> None:
        assert model.path is not None  # the config guarantees it for source: local
        self.repo_id = model.repo_id
        self.requested_revision = model.revision
        self.root = Path(model.path).expanduser()
        self.endpoint = None

    def where(self) -> str:
        return str(self.root)

    def list_files(self) -> Listing:
        root = self.root.resolve()
        if not root.is_dir():
            raise FetchError(
                f"local model folder {self.root} does not exist; set model.path to a folder with the "
                "weights (or model.generate: tiny-qwen2 for the demo model)",
                model=self.repo_id,
            )
        files: list[RemoteFile] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                full = here / d
                if d.startswith("."):
                    continue
                if full.is_symlink():
                    raise FetchError(
                        f"{full} is a symbolic link to a folder; copy the model into a plain folder "
                        "(cp -rL) and point model.path at it",
                        model=self.repo_id,
                    )
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                full = here / name
                rel = full.relative_to(root).as_posix()
                if name.startswith(".") or name.endswith((".incomplete", ".part", ".lock")):
                    continue
                real = full.resolve()
                if full.is_symlink() and not real.is_relative_to(root):
                    raise FetchError(
                        f"{full} links to {real}, outside {root}; copy the model into a plain folder "
                        "(cp -rL) and point model.path at it",
                        model=self.repo_id,
                    )
                if not real.is_file():
                    continue
                st = real.stat()
                files.append(RemoteFile(path=rel, size=st.st_size, local=real, mtime_ns=st.st_mtime_ns))
        return Listing(revision=self.requested_revision, files=files)

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        assert rf.local is not None
        _start_part(part, rf.size, fresh=True)
        try:
            with open(rf.local, "rb") as src, open(part, "wb") as out:
                while block := src.read(_COPY_CHUNK):
                    out.write(block)
                    sink(len(block))
            shutil.copystat(rf.local, part)
        except OSError as err:
            raise _disk_error(err, part) from err
        return part


def make_source(model: ModelSection) -> HfSource | ModelScopeSource | LocalSource:
    """The source adapter for ``model.source``."""
    if model.source is ModelSource.HF:
        return HfSource(model)
    if model.source is ModelSource.MODELSCOPE:
        return ModelScopeSource(model)
    return LocalSource(model)


def tree_digest(entries: list[tuple[str, str]]) -> str:
    """A content address for a set of (path, sha256) pairs (used as a local source's revision)."""
    h = hashlib.sha256()
    for path, digest in sorted(entries):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()
