"""The ``publish`` section of a release config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    field_validator,
)

from flagrelease._oci import parse_registry
from flagrelease.config._base import (
    _Strict,
)
from flagrelease.config._grammar import check_bucket, check_repo_id, check_s3_prefix, check_url
from flagrelease.errors import ConfigError

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
        return check_bucket(value)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return check_s3_prefix(value)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, what="endpoint_url")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", value):
            raise ValueError(f"region {value!r} must be lowercase letters, digits and '-', e.g. us-east-1")
        return value


class PublishSection(_Strict):
    """Where the bundle goes."""

    hf_repo: str | None = None
    modelscope_repo: str | None = None
    s3: S3Target | None = None
    registry: str | None = None
    local_dir: Path | None = None
    private: bool = False
    allow_verdicts: list[Literal["inconclusive", "missing"]] = Field(
        default_factory=list,
        description=(
            "Gate verdicts that may be published anyway (with a banner on the card); by default only a "
            "consistent release is published. 'missing' covers a release with no gate verdict."
        ),
    )

    @field_validator("hf_repo", "modelscope_repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_registry(value, what="publish.registry")
            except ConfigError as err:
                raise ValueError(err.message) from None
        return value
