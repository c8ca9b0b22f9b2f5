"""The ``model``, ``convert`` and ``image`` sections of a release config."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from flagrelease._oci import check_repository, check_tag, parse_reference, parse_registry
from flagrelease.config._base import (
    _BRANCHES,
    ConvertMode,
    ModelSource,
    _no_control,
    _Strict,
)
from flagrelease.config._grammar import (
    check_free_text,
    check_ignore_pattern,
    check_path_text,
    check_repo_id,
    check_url,
)
from flagrelease.errors import ConfigError

__all__ = ["ConvertSection", "ImageSection", "ModelSection"]


class ModelSection(_Strict):
    """The model to release and where to fetch it from."""

    source: ModelSource
    repo_id: str = Field(description="Hub repo id, e.g. deepseek-ai/DeepSeek-R1.")
    revision: str | None = Field(default=None, description="Pinned revision (commit sha) on the hub.")
    path: Path | None = Field(default=None, description="Local folder, for source: local.")
    allow_patterns: list[str] = Field(default_factory=list)
    ignore_patterns: list[str] = Field(default_factory=list)
    display_name: str | None = Field(default=None, description="Name used in cards; defaults to the repo name.")
    license: str = "apache-2.0"
    license_url: str | None = None
    generate: Literal["tiny-qwen2"] | None = Field(
        default=None, description="Generate this built-in model at `path` if it is missing (demo only)."
    )

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, value: str) -> str:
        return check_repo_id(value, what="hub repo id")

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return check_path_text(value, what="path")

    @field_validator("display_name")
    @classmethod
    def _display(cls, value: str | None) -> str | None:
        return None if value is None else check_free_text(value, what="display_name", max_len=128)

    @field_validator("license")
    @classmethod
    def _license(cls, value: str) -> str:
        return check_free_text(value, what="license", max_len=128)

    @field_validator("license_url")
    @classmethod
    def _license_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, what="license_url")

    @field_validator("allow_patterns", "ignore_patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pat in value:
            _no_control(pat, "a file pattern")
            if len(pat) > 256:
                raise ValueError(f"file pattern {pat[:40]!r}... is longer than 256 characters")
            if pat.startswith("/") or ".." in Path(pat).parts:
                raise ValueError(f"file pattern {pat!r} must be relative and stay inside the repo")
        return value

    @model_validator(mode="after")
    def _source_fields(self) -> ModelSection:
        if self.source is ModelSource.LOCAL:
            if self.path is None:
                raise ValueError("source 'local' needs 'path'")
        elif not self.revision:
            raise ValueError(f"source {self.source.value!r} needs a pinned 'revision' (a commit sha or tag)")
        if self.revision is not None:
            _no_control(self.revision, "revision")
            if not re.match(r"^[A-Za-z0-9._/-]{1,128}$", self.revision) or ".." in self.revision:
                raise ValueError(f"revision {self.revision!r} is not a valid git revision")
            if self.source is not ModelSource.LOCAL and self.revision in _BRANCHES:
                raise ValueError(
                    f"revision {self.revision!r} is a branch, not a pinned revision; use the commit sha "
                    "(hub page > Files > history) or a release tag"
                )
        return self

    @property
    def name(self) -> str:
        """Display name of the model."""
        return self.display_name or self.repo_id.split("/", 1)[1]


class ConvertSection(_Strict):
    """Checkpoint conversion."""

    mode: ConvertMode = ConvertMode.NONE
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head", "embed_tokens", "norm", "mlp.gate"],
        description="Name fragments of tensors that are never quantized.",
    )
    group_size: int = Field(default=128, ge=16, le=8192, description="Group size for INT4.")
    workers: int = Field(default=0, ge=0, le=1024, description="Worker threads; 0 uses every core.")
    allow_non_finite: bool = Field(
        default=False,
        description="Convert tensors holding NaN or Inf; by default such a tensor stops the conversion.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower().replace("_", "-")
        valid = [m.value for m in ConvertMode]
        if isinstance(value, str) and value not in valid:
            raise ValueError(f"unknown convert mode {value!r}; valid modes: {', '.join(valid)}")
        return value

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, value: list[str]) -> list[str]:
        return [check_ignore_pattern(p) for p in value]


class ImageSection(_Strict):
    """The container image for the release."""

    base: str | None = Field(default=None, description="Overrides the chip profile's base image.")
    name: str = "flagrelease"
    tag: str = "latest"
    registry: str | None = Field(default=None, description="Registry host[:port][/namespace] to push to.")
    build: bool = True
    push: bool = True
    on_missing_engine: Literal["fail", "keep-context"] = "fail"
    pip_index_url: str | None = None
    flag_gems_version: str | None = None
    vllm_version: str | None = None

    @field_validator("base")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        return None if value is None else _oci_check(parse_reference, value, "image.base")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _oci_check(check_repository, value, "image.name")

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        return _oci_check(check_tag, value, "image.tag")

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str | None) -> str | None:
        return None if value is None else _oci_check(parse_registry, value, "image.registry")

    @field_validator("pip_index_url")
    @classmethod
    def _index(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, what="pip_index_url")

    @field_validator("flag_gems_version", "vllm_version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and not _VERSION.fullmatch(value):
            raise ValueError(f"{value!r} is not a version (e.g. 5.0.2 or 'vendor')")
        return value

    @model_validator(mode="after")
    def _reference(self) -> ImageSection:
        prefix = f"{self.registry.strip().rstrip('/')}/" if self.registry else ""
        _oci_check(parse_reference, f"{prefix}{self.name}:{self.tag}", "image (registry/name:tag)")
        return self


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}")


def _oci_check(check: Callable[..., object], value: str, what: str) -> str:
    """Run an image-reference check of :mod:`flagrelease._oci`; its error as the ValueError pydantic reports."""
    try:
        check(value, what=what)
    except ConfigError as err:
        raise ValueError(err.message) from None
    return value
