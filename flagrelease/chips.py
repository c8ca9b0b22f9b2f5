"""Chip profiles: one YAML file per chip under ``templates/chips/``.

A profile says how a chip is driven: its vendor, FlagScale device type, FlagGems vendor
name, base image, environment, ``docker run`` flags and devices per node.  Adding a
chip means adding a YAML file (and, if its family is new, a Dockerfile template).
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from flagrelease._redact import find_secret
from flagrelease.constants import templates_dir
from flagrelease.errors import ConfigError

__all__ = ["Accelerator", "ChipProfile", "chips_dir", "list_chips", "load_chip"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class Accelerator(StrEnum):
    """What kind of device the chip is."""

    GPU = "gpu"
    NPU = "npu"
    CPU = "cpu"


class ChipProfile(BaseModel):
    """How to build for, and serve on, one chip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Profile name; equals the file stem.")
    vendor: str = Field(description="Vendor, e.g. nvidia, iluvatar.")
    display_name: str = Field(description="Human name used in cards, e.g. 'Iluvatar BI-V150'.")
    card_name: str = Field(description="Short chip name used in bundle titles, e.g. 'Iluvatar'.")
    device_type: str = Field(description="FlagScale device type, e.g. BI_V150, A100.")
    gems_vendor: str = Field(description="FlagGems vendor name (GEMS_VENDOR).")
    accelerator: Accelerator = Accelerator.GPU
    base_image: str = Field(description="Image the vendor Dockerfile starts FROM.")
    dockerfile_template: str = Field(description="Template under templates/docker/.")
    env: dict[str, str] = Field(default_factory=dict)
    docker_run_flags: list[str] = Field(default_factory=list)
    devices_per_node: int = Field(ge=1)
    nodes: int = Field(
        default=1,
        ge=1,
        description="Nodes behind the chip's work pool; the pool runs at most this many releases at once.",
    )
    device_visible_env: str | None = Field(
        default=None, description="Variable that selects devices, e.g. CUDA_VISIBLE_DEVICES."
    )
    work_pool: str = Field(description="Prefect work pool whose workers run on this chip.")
    runtime: str = Field(default="container", description="Default deploy runtime: local or container.")
    vllm_package: str = Field(default="vllm", description="pip requirement for the vendor's vLLM build.")
    vllm_version: str | None = Field(
        default=None,
        description="The vLLM version the image serves with, whose recorded argument list "
        "(flagrelease/data/vllm_args/<version>.json) checks engine args; default: vllm_package's pin.",
    )
    non_root: bool = Field(default=True, description="Whether the image may run as a non-root user.")
    python: str = Field(default="python3", description="Interpreter inside the base image.")
    notes: str = ""

    @field_validator("name", "work_pool")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits and '-'")
        return value

    @field_validator("vendor", "device_type", "gems_vendor", "vllm_version")
    @classmethod
    def _word(cls, value: str | None) -> str | None:
        if value is not None and not _WORD.fullmatch(value):
            raise ValueError(f"{value!r} must be letters, digits, '.', '_' or '-'")
        return value

    @field_validator("display_name", "card_name", "notes")
    @classmethod
    def _text(cls, value: str, info: ValidationInfo) -> str:
        bad = _CONTROL.search(value.replace("\n", " ") if info.field_name == "notes" else value)
        if bad:
            raise ValueError(f"holds the control character {bad.group()!r}; give it as one line")
        return value

    @field_validator("base_image")
    @classmethod
    def _image(cls, value: str) -> str:
        from flagrelease._oci import parse_reference

        try:
            parse_reference(value, what="base_image")
        except ConfigError as err:
            raise ValueError(err.message) from None
        return value

    @field_validator("dockerfile_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_-]+\.Dockerfile\.j2", value):
            raise ValueError(f"{value!r} must name a template in templates/docker/, e.g. nvidia.Dockerfile.j2")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_./-]{1,256}", value):
            raise ValueError(f"{value!r} must be an interpreter path or name, e.g. python3 or /opt/conda/bin/python")
        return value

    @field_validator("device_visible_env")
    @classmethod
    def _visible(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(f"environment variable name {value!r} is not valid")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if _CONTROL.search(str(val)):
                raise ValueError(f"environment value of {key} holds a control character")
            if find_secret(f"{key}={val}"):
                raise ValueError(f"environment value of {key} looks like a secret; a chip profile holds no secrets")
        return {k: str(v) for k, v in value.items()}

    @field_validator("docker_run_flags")
    @classmethod
    def _flags(cls, value: list[str]) -> list[str]:
        if value and not value[0].startswith("-"):
            raise ValueError(f"docker flags must start with an option, not {value[0]!r}")
        for token in value:
            if _CONTROL.search(token) or any(c in token for c in ";&|`$<>"):
                raise ValueError(f"docker flag {token!r} holds shell syntax; give one argv token per item")
        return value


def chips_dir() -> Path:
    """The folder that holds chip profiles."""
    return templates_dir() / "chips"


def list_chips() -> list[str]:
    """Names of every chip profile, sorted."""
    return sorted(p.stem for p in chips_dir().glob("*.yaml"))


@lru_cache(maxsize=64)
def _load(path: Path, mtime: float) -> ChipProfile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}", path=str(path)) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a chip profile must be a mapping", path=str(path))
    try:
        profile = ChipProfile.model_validate(data)
    except ValidationError as err:
        errors = [(".".join(map(str, e["loc"])), e["msg"]) for e in err.errors()]
        lines = "\n".join(f"  {path}: {f}: {m}" for f, m in errors)
        raise ConfigError(f"invalid chip profile {path.stem}:\n{lines}", path=str(path), errors=errors) from err
    if profile.name != path.stem:
        raise ConfigError(
            f"{path}: name: {profile.name!r} must equal the file name {path.stem!r}",
            path=str(path),
            errors=[("name", "must equal the file name")],
        )
    return profile


def load_chip(name: str) -> ChipProfile:
    """Load the chip profile called ``name``.

    Raises:
        ConfigError: no such profile (the message lists those that exist), or it is invalid.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"chip name {name!r} is not a valid profile name; known chips: {', '.join(list_chips())}")
    path = chips_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown chip {name!r}; known chips: {', '.join(list_chips())}",
            errors=[("chip", f"unknown chip {name!r}")],
            chip=name,
        )
    return _load(path, path.stat().st_mtime)
