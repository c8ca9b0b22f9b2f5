"""The ``publish`` section of a release config."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import (
    field_validator,
)

from flagrelease.config._base import (
    _REPO_ID,
    _Strict,
)

__all__ = ["PublishSection", "S3Target"]


class S3Target(_Strict):
    """An S3 bucket and prefix."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", value):
            raise ValueError(f"bucket {value!r} is not a valid S3 bucket name")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/") or any(c in value for c in "\n\x00\\"):
            raise ValueError(f"prefix {value!r} must be a plain key prefix")
        return value


class PublishSection(_Strict):
    """Where the bundle goes."""

    hf_repo: str | None = None
    modelscope_repo: str | None = None
    s3: S3Target | None = None
    registry: str | None = None
    local_dir: Path | None = None
    private: bool = False

    @field_validator("hf_repo", "modelscope_repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and (not _REPO_ID.match(value) or ".." in value):
            raise ValueError(f"{value!r} is not a repo id of the form 'owner/name'")
        return value
