"""Types shared by the publish module and its per-destination helpers."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DestinationResult", "PlannedFile", "content_type"]

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
    """

    name: str
    url: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The outputs form: ``{url, uploaded, skipped, bytes, details}`` with counts."""
        return {
            "url": self.url,
            "uploaded": len(self.uploaded),
            "skipped": len(self.skipped),
            "bytes": self.bytes_uploaded,
            "details": dict(self.details),
        }
