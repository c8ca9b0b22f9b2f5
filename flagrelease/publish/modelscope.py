"""Publish to ModelScope with its client (``HubApi``): idempotent and resumable.

The remote file list is compared with the local files (sha256); the files that differ are
staged (hard links) into a folder and sent with ``HubApi.upload_folder``, whose upload
tracker lives in the release's state folder so an interrupted upload resumes.  The repo
is created when it does not exist.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flagrelease._filehash import git_blob_sha1
from flagrelease.errors import PublishError
from flagrelease.publish._types import DestinationResult, PlannedFile

__all__ = ["publish_modelscope"]

log = logging.getLogger("flagrelease.publish.modelscope")


def _remote_files(api: Any, repo_id: str) -> dict[str, Any] | None:
    """path -> FileInfo of the repo's files; None when the repo does not exist."""
    from modelscope.hub.errors import NotExistError

    try:
        files = api.list_repo_files(repo_id, "model", revision="master", recursive=True)
    except NotExistError:
        return None
    return {f.path: f for f in files if getattr(f, "type", "blob") != "tree"}


def _matches(remote: Any, f: PlannedFile) -> bool:
    if remote is None:
        return False
    if getattr(remote, "size", None) not in (None, f.size):
        return False
    sha = getattr(remote, "sha256", None)
    if sha:
        return bool(sha == f.sha256)
    blob = getattr(remote, "blob_id", None)
    return bool(blob) and blob in (f.sha256, git_blob_sha1(f.local))


def _stage(files: list[PlannedFile], folder: Path) -> None:
    """Hard-link (or copy) ``files`` into ``folder`` at their repo paths."""
    shutil.rmtree(folder, ignore_errors=True)
    for f in files:
        dst = folder / f.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f.local, dst)
        except OSError:
            shutil.copy2(f.local, dst)


def publish_modelscope(
    files: list[PlannedFile],
    *,
    repo_id: str,
    bundle_name: str,
    token: str | None,
    endpoint: str,
    private: bool,
    license: str | None,
    staging_dir: Path,
    tracker_path: Path,
) -> DestinationResult:
    """Upload ``files`` to the ModelScope model repo ``repo_id``.

    Args:
        files: what to publish; ``README.md`` is the card.
        repo_id: ``owner/name``.
        bundle_name: named in the commit message.
        token: a ModelScope access token (None: the client's own login).
        endpoint: the ModelScope URL.
        private: create the repo private.
        license: license id for a new repo.
        staging_dir: a scratch folder for the files to send (removed afterwards).
        tracker_path: the client's resumable-upload tracker file.

    Returns:
        What was uploaded and skipped.

    Raises:
        PublishError: ModelScope refused a request, or the files do not verify after upload.
    """
    from modelscope.hub.api import HubApi
    from modelscope.hub.errors import HubError

    api = HubApi(endpoint=endpoint, token=token)
    url = f"{endpoint}/models/{repo_id}"
    result = DestinationResult(name="modelscope", url=url)
    try:
        remote = _remote_files(api, repo_id)
        if remote is None:
            api.create_repo(repo_id, visibility="private" if private else "public", license=license, exist_ok=True)
            remote = {}
        changed: list[PlannedFile] = []
        for f in files:
            if _matches(remote.get(f.path), f):
                result.skipped.append(f.path)
            else:
                changed.append(f)
        if changed:
            _stage(changed, staging_dir)
            try:
                api.upload_folder(
                    repo_id=repo_id,
                    folder_path=str(staging_dir),
                    commit_message=f"Publish {bundle_name}",
                    commit_description=f"Released with flagrelease: {len(changed)} file(s) of {bundle_name}.",
                    tracker_path=str(tracker_path),
                    use_cache=True,
                    disable_tqdm=True,
                )
            finally:
                shutil.rmtree(staging_dir, ignore_errors=True)
            after = _remote_files(api, repo_id) or {}
            bad = [f.path for f in changed if not _matches(after.get(f.path), f)]
            if bad:
                raise PublishError(
                    f"ModelScope {repo_id}: {len(bad)} file(s) do not match after the upload "
                    f"({', '.join(bad[:5])}); publish again to re-send them"
                )
            result.uploaded.extend(f.path for f in changed)
            result.bytes_uploaded += sum(f.size for f in changed)
            log.info("modelscope: sent %d file(s) to %s", len(changed), repo_id)
    except HubError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PublishError(
            f"ModelScope refused a request for {repo_id} ({type(err).__name__}: {first}); "
            "check MODELSCOPE_API_TOKEN (or the Prefect Secret block) may write to the repo, then publish again"
        ) from err
    except OSError as err:
        raise PublishError(
            f"cannot reach ModelScope at {endpoint} ({type(err).__name__}); publish again to resume"
        ) from err
    return result
