"""Shared pieces of the release config models: name grammars, the strict base model, enums."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import (
    BaseModel,
    ConfigDict,
)

__all__ = ["ConvertMode", "ModelSource", "RuntimeKind"]


_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_ARG_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


_HOST = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")


_OP_NAME = re.compile(r"^[A-Za-z0-9_.:]+$")


_BRANCHES = frozenset({"main", "master", "dev", "develop", "HEAD"})


def _no_control(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\x00"):
        raise ValueError(f"{what} must be one line with no control characters")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)


class ModelSource(StrEnum):
    """Where the weights come from."""

    HF = "hf"
    MODELSCOPE = "modelscope"
    LOCAL = "local"


class ConvertMode(StrEnum):
    """What the convert stage does to the checkpoint."""

    NONE = "none"
    FP8_BLOCK_TO_BF16 = "fp8-block-to-bf16"
    INT8_W8A8 = "int8-w8a8"
    INT8_W8A16 = "int8-w8a16"
    INT4_W4A16 = "int4-w4a16"


class RuntimeKind(StrEnum):
    """How the deploy stage runs the engine."""

    LOCAL = "local"
    CONTAINER = "container"
    MULTINODE = "multinode"
