"""What a fetch returns: the files it placed, and where partial transfers live."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._redact import redact_obj

__all__ = ["MANIFEST_NAME", "STAGING_NAME", "FetchResult", "FetchedFile", "partial_path"]

#: The manifest written into the destination folder.
MANIFEST_NAME = "fetch_manifest.json"
#: Partial transfers live here (inside the destination) until they are verified.
STAGING_NAME = ".flagrelease-fetch"


@dataclass
class FetchedFile:
    """One file of a fetch.

    Attributes:
        path: relative path inside the model folder (``/`` separators).
        size: bytes.
        sha256: content sha256 (None only in a dry-run plan).
        verified_by: what the content was checked against: ``hub-sha256`` (the hub's LFS or
            ModelScope checksum), ``git-blob-sha1`` (the hub's git blob id), ``manifest`` (an
            earlier verified fetch), ``copy`` (a local source) or ``size`` (no checksum known).
        action: ``downloaded``, ``resumed``, ``redownloaded``, ``copied``, ``reused`` (already
            on disk and verified), ``planned`` or ``present`` (dry run).
    """

    path: str
    size: int
    sha256: str | None
    verified_by: str
    action: str

    def to_json(self) -> dict[str, Any]:
        """The manifest entry of this file."""
        return {
            "file": self.path,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "verified_by": self.verified_by,
            "action": self.action,
        }


@dataclass
class FetchResult:
    """What a fetch did (or, with ``dry_run``, would do).

    Attributes:
        model_dir: the folder holding the model.
        manifest: path of ``fetch_manifest.json`` (None in a dry run).
        source: ``hf``, ``modelscope`` or ``local``.
        repo_id: the hub repo id.
        revision: the resolved revision (a commit sha on the HF Hub; the pinned revision on
            ModelScope; ``sha256:<digest of the file list>`` for a local folder without one).
        requested_revision: the revision the config pinned.
        endpoint: the hub endpoint, without credentials (None for a local source).
        files: every file, sorted by path.
        bytes: total size of the files.
        downloaded_bytes: bytes transferred (or, in a dry run, to transfer).
        network: whether the hub was contacted.
        dry_run: whether this is only a plan.
        elapsed_s: wall time.
        notes: remarks for people (e.g. a generated demo model).
    """

    model_dir: Path
    manifest: Path | None
    source: str
    repo_id: str
    revision: str | None
    requested_revision: str | None
    endpoint: str | None
    files: list[FetchedFile] = field(default_factory=list)
    bytes: int = 0
    downloaded_bytes: int = 0
    network: bool = True
    dry_run: bool = False
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-able data, secrets redacted."""
        data = asdict(self)
        data["model_dir"] = str(self.model_dir)
        data["manifest"] = str(self.manifest) if self.manifest else None
        data["files"] = [f.to_json() for f in self.files]
        return redact_obj(data)


def partial_path(dest: Path, name: str) -> Path:
    """Where the partial transfer of file ``name`` lives while it downloads into ``dest``."""
    return Path(dest) / STAGING_NAME / f"{name}.part"
