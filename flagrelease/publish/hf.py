"""Publish to the Hugging Face Hub with huggingface_hub: idempotent and resumable.

The repo is created if missing.  The remote tree is listed and compared with the local
files (sha256 of LFS files, git blob id of the others); only files that differ are
committed.  Large uploads are split into several commits (weights first, the card and the
manifest last), so an interrupted publish keeps what it committed, and LFS objects that
reached the Hub before an interruption are not sent again (the LFS batch API reports
them as present).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flagrelease._filehash import git_blob_sha1
from flagrelease.errors import PublishError
from flagrelease.publish._types import DestinationResult, PlannedFile

__all__ = ["hf_batches", "publish_hf"]

log = logging.getLogger("flagrelease.publish.hf")

#: Bundle files committed last, so a partial publish never shows a finished card.
_LAST = ("flagrelease.json", "README.md")


def hf_batches(files: list[PlannedFile], *, max_bytes: int, max_files: int) -> list[list[PlannedFile]]:
    """Split ``files`` into commits: weights first, then the bundle, README.md and the manifest last."""

    def order(f: PlannedFile) -> tuple[int, str]:
        if f.path in _LAST:
            return (2, f.path)
        return (0 if f.kind == "weights" else 1, f.path)

    batches: list[list[PlannedFile]] = []
    current: list[PlannedFile] = []
    size = 0
    last = [f for f in files if f.path in _LAST]
    for f in sorted((f for f in files if f.path not in _LAST), key=order):
        if current and (size + f.size > max_bytes or len(current) >= max_files):
            batches.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        batches.append(current)
    if last:
        batches.append(sorted(last, key=order))
    return batches


def _remote_matches(remote: Any, f: PlannedFile) -> bool:
    if remote is None or getattr(remote, "size", None) != f.size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return bool(lfs.sha256 == f.sha256)
    return bool(remote.blob_id == git_blob_sha1(f.local))


def publish_hf(
    files: list[PlannedFile],
    *,
    repo_id: str,
    bundle_name: str,
    token: str | None,
    endpoint: str,
    private: bool,
    max_commit_bytes: int = 50 << 30,
    max_commit_files: int = 500,
    on_commit: Callable[[int, int], None] | None = None,
) -> DestinationResult:
    """Upload ``files`` to the model repo ``repo_id`` on the Hub at ``endpoint``.

    Args:
        files: what to publish; ``README.md`` (the card) becomes the repo's card.
        repo_id: ``owner/name``.
        bundle_name: named in every commit message.
        token: a write token (None: huggingface_hub's own lookup).
        endpoint: the Hub URL.
        private: create the repo private.
        max_commit_bytes: split commits above this many bytes.
        max_commit_files: split commits above this many files.
        on_commit: called after each commit with (commits done, commits in all).

    Returns:
        What was uploaded and skipped; ``details`` holds the commit ids.

    Raises:
        PublishError: the Hub refused a request; the message says what to check.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    url = f"{endpoint}/{repo_id}"
    result = DestinationResult(name="hf", url=url, details={"commits": []})
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        remote = {item.path: item for item in api.list_repo_tree(repo_id, recursive=True) if isinstance(item, RepoFile)}
        changed = []
        for f in files:
            if _remote_matches(remote.get(f.path), f):
                result.skipped.append(f.path)
            else:
                changed.append(f)
        batches = hf_batches(changed, max_bytes=max_commit_bytes, max_files=max_commit_files)
        for i, batch in enumerate(batches, 1):
            part = f" ({i}/{len(batches)})" if len(batches) > 1 else ""
            ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local)) for f in batch]
            info = api.create_commit(
                repo_id,
                operations=ops,
                commit_message=f"Publish {bundle_name}{part}",
                commit_description=f"Released with flagrelease: {len(batch)} file(s) of the {bundle_name} bundle.",
                repo_type="model",
            )
            result.details["commits"].append(info.oid)
            result.uploaded.extend(f.path for f in batch)
            result.bytes_uploaded += sum(f.size for f in batch)
            log.info("hf: committed %d file(s) to %s%s", len(batch), repo_id, part)
            if on_commit is not None:
                on_commit(i, len(batches))
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = (
            f"check that HF_TOKEN (or the Prefect Secret block) is a token with write access to {repo_id.split('/')[0]}"
            if status in (401, 403)
            else "publish again to resume; files already committed are skipped"
        )
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PublishError(
            f"the Hugging Face Hub refused a request for {repo_id} (HTTP {status}: {first}); {hint}"
        ) from err
    except RuntimeError as err:  # huggingface_hub wraps a failed LFS upload in a RuntimeError
        cause = err.__cause__
        raise PublishError(
            f"uploading to {repo_id} failed ({err}: {str(cause).splitlines()[0] if cause else ''}); "
            "publish again to resume: objects already on the Hub are not sent again"
        ) from err
    except OSError as err:
        raise PublishError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}); publish again to resume"
        ) from err
    return result
