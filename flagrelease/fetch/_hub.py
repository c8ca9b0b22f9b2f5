"""The hubs the fetch stage downloads from: the Hugging Face Hub and ModelScope.

Both list one pinned revision with the sizes and checksums the hub publishes, and
transfer into a partial file that a later run resumes with a range request.  Every value
of a listing is checked (:func:`~flagrelease.fetch._sources.listed_file`) before use.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any

from flagrelease import constants
from flagrelease._redact import redact
from flagrelease.config import ModelSection
from flagrelease.errors import FetchError
from flagrelease.fetch._names import clean_endpoint
from flagrelease.fetch._sources import ByteSink, Listing, RemoteFile, disk_error, listed_file, start_part

__all__ = ["HfSource", "ModelScopeSource"]

log = logging.getLogger("flagrelease.fetch")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def _malformed(where: str, err: Exception, repo_id: str) -> FetchError:
    return FetchError(
        f"{where}: the hub's file listing is malformed ({type(err).__name__}: {redact(str(err))[:200]}); check the "
        "endpoint (HF_ENDPOINT / MODELSCOPE_ENDPOINT), the repo id and the revision",
        model=repo_id,
    )


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
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # the client could not parse the answer
            raise _malformed(self.where(), err, self.repo_id) from err
        files: list[RemoteFile] = []
        for e in entries:
            if not isinstance(e, RepoFile):
                continue
            lfs_sha = _check_digest(e.lfs.sha256, _SHA256) if e.lfs is not None else None
            git_sha1 = None if e.lfs is not None else _check_digest(e.blob_id, _SHA1)
            files.append(
                listed_file(e.path, e.size, where=self.where(), repo_id=self.repo_id, sha256=lfs_sha, git_sha1=git_sha1)
            )
        return Listing(revision=self._commit, files=files)

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        have = start_part(part, rf.size, fresh=fresh)
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
                raise disk_error(err, part) from err
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
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # the client could not parse the answer
            raise _malformed(self.where(), err, self.repo_id) from err
        files: list[RemoteFile] = []
        for info in infos:
            kind = str(getattr(info, "type", "blob") or "blob").lower()
            if kind in ("tree", "dir", "directory"):
                continue
            if kind not in ("blob", "file"):
                name = getattr(info, "path", None)
                raise FetchError(
                    f"{self.where()}: {name!r} is a {kind}, not a regular file; refusing to fetch it "
                    "(leave it out with model.ignore_patterns)",
                    model=self.repo_id,
                )
            files.append(
                listed_file(
                    getattr(info, "path", None),
                    getattr(info, "size", None) or 0,
                    where=self.where(),
                    repo_id=self.repo_id,
                    sha256=_check_digest(getattr(info, "sha256", None), _SHA256),
                )
            )
        return Listing(revision=self.requested_revision, files=files)

    def download(self, rf: RemoteFile, part: Path, *, fresh: bool, sink: ByteSink) -> Path:
        import requests
        import urllib3
        from modelscope.hub.callback import ProgressCallback
        from modelscope.hub.file_download import get_file_download_url, http_get_model_file

        start_part(part, rf.size, fresh=fresh)

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
            raise disk_error(err, part) from err
        return part
