"""Publish to ModelScope with its client (``HubApi``): private, verified, resumable.

- The repo is created private.  The remote file list is compared with the local files
  (sha256); the files that differ are staged (hard links) into a folder and sent with
  ``HubApi.upload_folder``, whose upload tracker lives in the release's state folder so
  an interrupted upload resumes.
- Every file is then downloaded back with the client and its sha256 compared with the
  manifest's.
- ModelScope's client offers no call that changes a model repo's visibility, so the repo
  stays private: the result carries a warning that says to make it public in its
  settings (unless ``publish.private``).  A repo that is already public is not written
  to (a half-updated release would be public); the error says to make it private first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flagrelease._filehash import git_blob_sha1, sha256_file
from flagrelease.errors import PublishError
from flagrelease.publish._types import Destination, DestinationResult, PlannedFile, check_sha256

__all__ = ["ModelScopeDestination"]

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


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    from modelscope.hub.errors import HubError

    try:
        yield
    except PublishError:
        raise  # ours already says what to do (it is an OSError too)
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


def _is_private(info: Any) -> bool:
    if getattr(info, "private", None) is not None:
        return bool(info.private)
    return int(getattr(info, "visibility", 5) or 5) == 1


class ModelScopeDestination(Destination):
    """A model repo on ModelScope.

    Args:
        repo_id: ``owner/name``.
        bundle_name: named in the commit message.
        token: a ModelScope access token (None: the client's own login).
        endpoint: the ModelScope URL.
        private: keep the repo private (``publish.private``); else the result asks a
            person to make it public.
        license: license id for a new repo.
        staging_dir: a scratch folder for the files to send (removed afterwards).
        tracker_path: the client's resumable-upload tracker file.
    """

    name = "modelscope"

    def __init__(
        self,
        *,
        repo_id: str,
        bundle_name: str,
        token: str | None,
        endpoint: str,
        private: bool,
        license: str | None,
        staging_dir: Path,
        tracker_path: Path,
    ) -> None:
        from modelscope.hub.api import HubApi

        self.repo_id, self.bundle_name, self.endpoint, self.private = repo_id, bundle_name, endpoint, private
        self.license, self.staging_dir, self.tracker_path = license, staging_dir, tracker_path
        self.url = f"{endpoint}/models/{repo_id}"
        self.api = HubApi(endpoint=endpoint, token=token)

    def _verify(self, files: list[PlannedFile]) -> list[str]:
        """Download every file back with the client and compare its sha256."""
        got: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="flagrelease-ms-verify-", dir=self.staging_dir.parent) as tmp:
            for f in files:
                path = self.api.download_file(
                    self.repo_id, "model", f.path, revision="master", local_dir=tmp, force=True
                )
                got[f.path] = sha256_file(Path(path))
                Path(path).unlink()
        return check_sha256(got, files, where=f"the private ModelScope repo {self.repo_id}")

    def stage(self, files: list[PlannedFile]) -> DestinationResult:
        """Send what differs to the private repo, then download every file back and verify it."""
        api, repo_id = self.api, self.repo_id
        result = DestinationResult(name=self.name, url=self.url)
        self.staging_dir.parent.mkdir(parents=True, exist_ok=True)
        with _hub_errors(repo_id, self.endpoint):
            remote = _remote_files(api, repo_id)
            created = remote is None
            if remote is None:
                api.create_repo(repo_id, visibility="private", license=self.license, exist_ok=True)
                remote = {}
            changed: list[PlannedFile] = []
            for f in files:
                if _matches(remote.get(f.path), f):
                    result.skipped.append(f.path)
                else:
                    changed.append(f)
            # Its visibility matters only when files change or it is to be public.
            private = created or (self.private and not changed) or _is_private(api.get_repo(repo_id, "model"))
            result.details["private"] = private
            if changed and not private:
                raise PublishError(
                    f"the ModelScope repo {repo_id} is public and {len(changed)} file(s) must change; flagrelease "
                    "uploads only into a private repo, and ModelScope's API cannot change visibility: make the repo "
                    "private in its settings, publish, then make it public again"
                )
            if changed:
                _stage(changed, self.staging_dir)
                try:
                    api.upload_folder(
                        repo_id=repo_id,
                        folder_path=str(self.staging_dir),
                        commit_message=f"Publish {self.bundle_name}",
                        commit_description=f"Released with flagrelease: {len(changed)} file(s) of {self.bundle_name}.",
                        tracker_path=str(self.tracker_path),
                        use_cache=True,
                        disable_tqdm=True,
                    )
                finally:
                    shutil.rmtree(self.staging_dir, ignore_errors=True)
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
            if private and (changed or not self.private):
                result.verified = self._verify(files)
        return result

    def promote(self, result: DestinationResult) -> None:
        """Nothing the API can do: ask for the visibility change unless the repo stays private by config."""
        if not result.details.get("private"):
            result.promoted = True
            return
        if not self.private:
            result.warnings.append(
                f"ModelScope: {self.repo_id} holds the verified release but is private (ModelScope's API cannot "
                f"change visibility); make it public in its settings: {self.url}"
            )
