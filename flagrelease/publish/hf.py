"""Publish to the Hugging Face Hub with huggingface_hub: private first, verified, then public.

- The repo is created private.  A public repo whose files must change is made private
  first, so that a half-updated release is never public.
- The remote tree is listed and compared with the local files (sha256 of LFS files, git
  blob id of the others); only files that differ are committed.  Large uploads are split
  into several commits (weights first, the card and the manifest last), so an interrupted
  publish keeps what it committed, and LFS objects that reached the Hub before an
  interruption are not sent again (the LFS batch API reports them as present).
- Every file is then downloaded back at the commit just made and its sha256 compared
  with the manifest's.  Only then is the repo made public (unless ``publish.private``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from flagrelease._filehash import git_blob_sha1
from flagrelease.errors import PublishError
from flagrelease.publish._types import Destination, DestinationResult, PlannedFile, check_sha256, sha256_of

__all__ = ["HFDestination", "hf_batches"]

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


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Turn the client's errors into a PublishError that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except PublishError:
        raise  # ours already says what to do (it is an OSError too)
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


class HFDestination(Destination):
    """A model repo on the Hugging Face Hub.

    Args:
        repo_id: ``owner/name``.
        bundle_name: named in every commit message.
        token: a write token (None: huggingface_hub's own lookup).
        endpoint: the Hub URL.
        private: keep the repo private after publishing (``publish.private``).
        max_commit_bytes: split commits above this many bytes.
        max_commit_files: split commits above this many files.
        on_commit: called after each commit with (commits done, commits in all).
    """

    name = "hf"

    def __init__(
        self,
        *,
        repo_id: str,
        bundle_name: str,
        token: str | None,
        endpoint: str,
        private: bool,
        max_commit_bytes: int = 50 << 30,
        max_commit_files: int = 500,
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.repo_id, self.bundle_name, self.token, self.endpoint = repo_id, bundle_name, token, endpoint
        self.private = private
        self.max_commit_bytes, self.max_commit_files = max_commit_bytes, max_commit_files
        self.on_commit = on_commit
        self.url = f"{endpoint}/{repo_id}"
        self.api = HfApi(endpoint=endpoint, token=token)

    def _repo_private(self) -> bool | None:
        """Whether the repo is private; None when it does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            info = self.api.repo_info(self.repo_id, repo_type="model")
        except RepositoryNotFoundError:
            return None
        return bool(info.private)

    def _download_sha256(self, path: str, revision: str) -> str:
        """Download ``path`` at ``revision`` and hash it (streamed; redirects are followed without the token)."""
        import httpx

        url = f"{self.endpoint}/{self.repo_id}/resolve/{revision}/{quote(path)}"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=600) as resp:
            if resp.status_code != 200:
                raise PublishError(
                    f"downloading {path} back from {self.repo_id} failed (HTTP {resp.status_code}); nothing was made "
                    "public; publish again"
                )
            return sha256_of(resp.iter_bytes(8 << 20))

    def stage(self, files: list[PlannedFile]) -> DestinationResult:
        """Commit what differs into the private repo, then download every file back and verify it."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.hf_api import RepoFile

        api, repo_id = self.api, self.repo_id
        result = DestinationResult(name=self.name, url=self.url, details={"commits": []})
        with _hub_errors(repo_id, self.endpoint):
            private = self._repo_private()
            if private is None:
                api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
                private = True
            remote = {
                item.path: item for item in api.list_repo_tree(repo_id, recursive=True) if isinstance(item, RepoFile)
            }
            changed = []
            for f in files:
                if _remote_matches(remote.get(f.path), f):
                    result.skipped.append(f.path)
                else:
                    changed.append(f)
            if changed and not private:
                log.warning("hf: %s is public; making it private while %d file(s) change", repo_id, len(changed))
                api.update_repo_settings(repo_id, private=True, repo_type="model")
                private = True
                result.details["hidden_during_update"] = True
            result.details["private_before_promotion"] = private
            batches = hf_batches(changed, max_bytes=self.max_commit_bytes, max_files=self.max_commit_files)
            for i, batch in enumerate(batches, 1):
                part = f" ({i}/{len(batches)})" if len(batches) > 1 else ""
                ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local)) for f in batch]
                info = api.create_commit(
                    repo_id,
                    operations=ops,
                    commit_message=f"Publish {self.bundle_name}{part}",
                    commit_description=f"Released with flagrelease: {len(batch)} file(s) of the {self.bundle_name} "
                    "bundle.",
                    repo_type="model",
                )
                result.details["commits"].append(info.oid)
                result.uploaded.extend(f.path for f in batch)
                result.bytes_uploaded += sum(f.size for f in batch)
                log.info("hf: committed %d file(s) to %s%s", len(batch), repo_id, part)
                if self.on_commit is not None:
                    self.on_commit(i, len(batches))
            if private and (changed or not self.private):
                revision = api.repo_info(repo_id, repo_type="model").sha or "main"
                result.details["revision"] = revision
                got = {f.path: self._download_sha256(f.path, revision) for f in files}
                result.verified = check_sha256(got, files, where=f"the private repo {repo_id} at {revision}")
        return result

    def promote(self, result: DestinationResult) -> None:
        """Make the repo public, unless ``publish.private`` keeps it private."""
        if self.private or not result.details.get("private_before_promotion"):
            result.promoted = not self.private
            return
        with _hub_errors(self.repo_id, self.endpoint):
            self.api.update_repo_settings(self.repo_id, private=False, repo_type="model")
        result.promoted = True
        log.info("hf: %s is public", self.repo_id)
