"""Types shared by the publish orchestration and its destinations."""

from __future__ import annotations

import abc
import hashlib
import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease.errors import PublishError

__all__ = ["Destination", "DestinationResult", "PlannedFile", "check_sha256", "content_type", "sha256_of"]

_TYPES = {
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".sh": "text/x-shellscript",
    ".safetensors": "application/octet-stream",
    ".bin": "application/octet-stream",
    ".model": "application/octet-stream",
    ".py": "text/x-python",
}


def content_type(path: str) -> str:
    """The Content-Type to store a file under, from its name."""
    suffix = Path(path).suffix.lower()
    if suffix in _TYPES:
        return _TYPES[suffix]
    if Path(path).name == "Dockerfile":
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


@dataclass(frozen=True)
class PlannedFile:
    """One file to publish.

    Attributes:
        path: where it goes, relative to the destination root (``/`` separators).
        local: the local file.
        size: bytes.
        sha256: hex digest, checked against the manifest before publishing.
        kind: ``bundle`` or ``weights``.
    """

    path: str
    local: Path
    size: int
    sha256: str
    kind: str = "bundle"


@dataclass
class DestinationResult:
    """What publishing to one destination did.

    Attributes:
        name: ``local``, ``hf``, ``modelscope``, ``s3`` or ``registry``.
        url: where the bundle now is.
        uploaded: paths sent (or, for the registry, the image reference pushed).
        skipped: paths already there with the same content.
        bytes_uploaded: bytes sent.
        details: destination-specific facts (commit ids, resumed parts, digest).
        verified: paths downloaded back from the private or staging copy and checked
            against their sha256 before promotion.
        promoted: whether the upload was made public (or moved to its final place).
        warnings: what a person must still do (a visibility the API cannot change, say).
    """

    name: str
    url: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)
    promoted: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The outputs form: ``{url, uploaded, skipped, bytes, details, verified, promoted, warnings}`` with counts."""
        return {
            "url": self.url,
            "uploaded": len(self.uploaded),
            "skipped": len(self.skipped),
            "bytes": self.bytes_uploaded,
            "details": dict(self.details),
            "verified": len(self.verified),
            "promoted": self.promoted,
            "warnings": list(self.warnings),
        }


def sha256_of(chunks: Iterable[bytes]) -> str:
    """The sha256 (hex) of a stream of chunks."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def check_sha256(got: dict[str, str], files: list[PlannedFile], *, where: str) -> list[str]:
    """Compare downloaded sha256s with the planned ones; returns the paths checked.

    Raises:
        PublishError: a file is missing or differs; nothing is promoted.
    """
    bad = [f.path for f in files if got.get(f.path) != f.sha256]
    if bad:
        raise PublishError(
            f"{where}: {len(bad)} file(s) downloaded back do not match the manifest's sha256 "
            f"({', '.join(bad[:5])}); nothing was made public. Publish again to re-send them"
        )
    return [f.path for f in files]


class Destination(abc.ABC):
    """One place a bundle goes, in two steps: staged privately and verified, then promoted.

    :meth:`stage` uploads where nobody else sees the files (a private repo, an S3 staging
    prefix, a hidden folder), downloads them back and checks every sha256.  Only when every
    destination staged and verified does the orchestrator call :meth:`promote`, which makes
    the upload public.  Both steps are idempotent, so an interrupted publish is resumed by
    publishing again.
    """

    name: str = ""
    url: str = ""

    @abc.abstractmethod
    def stage(self, files: list[PlannedFile]) -> DestinationResult:
        """Upload ``files`` privately, download them back and verify them.

        Raises:
            PublishError: an upload was refused or a file does not verify.
        """

    @abc.abstractmethod
    def promote(self, result: DestinationResult) -> None:
        """Make what :meth:`stage` verified public; records it in ``result``.

        Raises:
            PublishError: the destination refused.
        """
