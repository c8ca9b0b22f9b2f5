"""Shared pieces of the release config models: name grammars, the strict base model, enums.

Every section model derives from ``_Strict``, which refuses what a careless or hostile
config could slip past pydantic's lax parsing, for every field, including fields added
later:

* numbers are numbers: ``true`` is not an integer, ``"8"`` and ``8.0`` are not either, and
  no number is infinite, NaN or beyond :data:`MAX_INT` / :data:`MAX_FLOAT`;
* text holds no control characters (a newline would break the one-line contexts values
  are rendered into: shell words, YAML scalars, Markdown table cells, comments) and is at
  most :data:`MAX_TEXT` characters, unless the field is listed in ``_MULTILINE``.
"""

from __future__ import annotations

import re
import types
import typing
from enum import StrEnum
from functools import lru_cache
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
)

from flagrelease.config._grammar import check_env_name, check_free_text

__all__ = ["MAX_FLOAT", "MAX_INT", "MAX_TEXT", "ConvertMode", "ModelSource", "RuntimeKind", "SecretRef"]

#: The largest integer any config field takes (fields set tighter bounds of their own).
MAX_INT = 2**31 - 1
#: The largest magnitude of any float field.
MAX_FLOAT = 1e9
#: The longest text any field takes (fields set tighter bounds of their own).
MAX_TEXT = 4096

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_ARG_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


_HOST = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")


_OP_NAME = re.compile(r"^[A-Za-z0-9_.:]{1,128}$")


_BRANCHES = frozenset({"main", "master", "dev", "develop", "HEAD"})

# Fields whose text may span lines (never rendered into a one-line context).
_MULTILINE = frozenset({"prompt"})


def _no_control(value: str, what: str) -> str:
    return check_free_text(value, what=what, max_len=MAX_TEXT)


def _mentions_model(annotation: Any, depth: int = 0) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return depth < 4 and any(_mentions_model(a, depth + 1) for a in typing.get_args(annotation))


@lru_cache(maxsize=1024)
def _field_kind(model: type[BaseModel], name: str) -> tuple[str | None, bool]:
    """Field ``name`` of ``model``: ``"int"``/``"float"`` when it is a number (optionally None), else None;
    and whether its text is checked here (False when a model inside checks its own)."""
    field = model.model_fields.get(name)
    if field is None:
        return None, True
    annotation = field.annotation
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    kinds = {a for a in (args or (annotation,)) if a is not type(None)}
    walk = not _mentions_model(annotation)
    if kinds == {bool}:
        return "bool", walk
    if kinds == {int}:
        return "int", walk
    if kinds in ({float}, {int, float}):
        return "float", walk
    return None, walk


def _check_text_tree(value: Any, *, what: str, multiline: bool, depth: int = 0) -> None:
    """Every string in ``value`` (a scalar, list or mapping, keys too) passes the free-text check."""
    if depth > 16:
        raise ValueError(f"{what} is nested too deeply")
    if isinstance(value, str):
        check_free_text(value, what=what, max_len=MAX_TEXT, newlines=multiline)
    elif isinstance(value, list | tuple):
        if len(value) > 4096:
            raise ValueError(f"{what} has {len(value)} items; 4096 at most")
        for item in value:
            _check_text_tree(item, what=what, multiline=multiline, depth=depth + 1)
    elif isinstance(value, dict):
        if len(value) > 4096:
            raise ValueError(f"{what} has {len(value)} entries; 4096 at most")
        for key, item in value.items():
            _check_text_tree(key, what=f"{what} key", multiline=False, depth=depth + 1)
            _check_text_tree(item, what=what, multiline=multiline, depth=depth + 1)


def check_input(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """The checks every config field gets before pydantic's own (see the module docstring)."""
    name = info.field_name or "value"
    kind, walk = _field_kind(model, name)
    if kind == "bool":
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}"[:120])
    elif kind is not None and value is not None:
        noun = "an integer" if kind == "int" else "a number"
        if isinstance(value, bool):
            raise ValueError(f"must be {noun}, not {str(value).lower()}")
        if isinstance(value, str):
            example = "8" if kind == "int" else "0.5 or 1.0e+3"
            raise ValueError(f"must be {noun}, not the text {value[:40]!r} (write it without quotes, e.g. {example})")
        if kind == "int" and isinstance(value, float):
            raise ValueError(f"must be an integer (a whole number), not {value!r}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ValueError(f"{value} is out of range; {MAX_INT} at most")
        if isinstance(value, float) and not abs(value) <= MAX_FLOAT:
            if abs(value) == float("inf") or value != value:
                raise ValueError(f"must be a finite number, not {value!r}")
            raise ValueError(f"{value!r} is out of range; {MAX_FLOAT:g} at most")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ValueError(f"{value} is out of range; {MAX_INT} at most")
        if isinstance(value, float) and (value != value or abs(value) > MAX_FLOAT):
            raise ValueError(f"{value!r} is not a finite number of at most {MAX_FLOAT:g}")
    if walk:
        _check_text_tree(value, what=name, multiline=name in _MULTILINE)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _input(cls, value: Any, info: ValidationInfo) -> Any:
        return check_input(cls, value, info)


class SecretRef(_Strict):
    """A secret given by reference (``{secret: NAME}``), never by value.

    Resolved at run time from the environment variable ``NAME`` or, under Prefect, the
    Secret block :attr:`block_name`; passed to processes through their environment and
    written to no file (a rendered script reads ``$NAME``).
    """

    secret: str

    @field_validator("secret")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_env_name(value, what="secret name")

    @property
    def block_name(self) -> str:
        """The Prefect Secret block that holds it: the name in lowercase, ``_`` as ``-``."""
        return self.secret.lower().replace("_", "-")


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
