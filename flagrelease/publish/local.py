"""Publish to a local folder: staged in a hidden sibling folder, verified, then swapped in.

The staging folder (``.<name>.flagrelease-staging`` beside ``publish.local_dir``) gets
every file: unchanged ones hard-linked from the current publish, the others copied.
Each staged file is hashed again and compared with the manifest's sha256.  Promotion
replaces the published folder with the staging folder in one rename
(:func:`flagrelease._atomic.replace_dir`), so the folder is always either the previous
release or the new one, whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from flagrelease._atomic import atomic_copy, replace_dir
from flagrelease._filehash import HashCache, walk_files
from flagrelease.bundle import MANIFEST_NAME
from flagrelease.errors import PublishError
from flagrelease.publish._types import Destination, DestinationResult, PlannedFile, check_sha256

__all__ = ["LocalDestination"]

log = logging.getLogger("flagrelease.publish.local")


def _same(dst: Path, f: PlannedFile, cache: HashCache) -> bool:
    return dst.is_file() and not dst.is_symlink() and dst.stat().st_size == f.size and cache.sha256(dst) == f.sha256


class LocalDestination(Destination):
    """``publish.local_dir``.

    Args:
        dest: the published folder.
        cache: hashes of files already seen.
    """

    name = "local"

    def __init__(self, dest: Path, *, cache: HashCache) -> None:
        self.dest = Path(dest)
        self.url = str(self.dest)
        self.cache = cache
        self.staging = self.dest.with_name(f".{self.dest.name}.flagrelease-staging")

    def stage(self, files: list[PlannedFile]) -> DestinationResult:
        """Build the staging folder and verify every file in it (nothing happens when the folder is current)."""
        dest = self.dest
        result = DestinationResult(name=self.name, url=self.url)
        if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST_NAME).is_file())):
            raise PublishError(
                f"publish.local_dir {dest} exists and is not a published bundle (it has no {MANIFEST_NAME}); "
                "publishing replaces the folder, so point local_dir at an empty or new folder"
            )
        existing = {e.path for e in walk_files(dest, cache=self.cache)} if dest.is_dir() else set()
        same = {f.path for f in files if _same(dest / f.path, f, self.cache)}
        shutil.rmtree(self.staging, ignore_errors=True)
        if same == {f.path for f in files} and existing == same:
            result.skipped.extend(sorted(same))
            result.details["current"] = True
            return result
        self.staging.mkdir(parents=True)
        for f in files:
            out = self.staging / f.path
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.path in same:
                try:
                    os.link(dest / f.path, out)
                except OSError:
                    shutil.copy2(dest / f.path, out)
                result.skipped.append(f.path)
            else:
                atomic_copy(f.local, out)
                result.uploaded.append(f.path)
                result.bytes_uploaded += f.size
        got = {f.path: self.cache.sha256(self.staging / f.path) for f in files}
        result.verified = check_sha256(got, files, where=f"the staging folder {self.staging}")
        log.info("local: %d file(s) copied, %d unchanged, into %s", len(result.uploaded), len(result.skipped), dest)
        return result

    def promote(self, result: DestinationResult) -> None:
        """Swap the staging folder in (a no-op when the folder was already current)."""
        if result.details.get("current"):
            result.promoted = True
            return
        if not self.staging.is_dir():
            raise PublishError(f"the staging folder {self.staging} is gone; publish again")
        replace_dir(self.staging, self.dest)
        result.promoted = True
