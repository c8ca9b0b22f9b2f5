"""Reading release config files, with errors that name the file and each bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from flagrelease.config._release import (
    ReleaseConfig,
)
from flagrelease.errors import ConfigError

__all__ = ["load_release", "parse_release", "validate_files"]


def _format_errors(path: str, err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and section)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        bad = e.get("input")
        if (
            e["type"] not in ("missing", "extra_forbidden")
            and isinstance(bad, str | int | float | bool)
            and repr(bad) not in msg
        ):
            msg = f"{msg} (got {bad!r})"
        out.append((loc, msg))
    return out


def _resolve_paths(cfg: ReleaseConfig, base: Path) -> ReleaseConfig:
    """Resolve relative paths in the config against the config file's folder."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    cfg.model.path = fix(cfg.model.path)
    cfg.eval.include_path = fix(cfg.eval.include_path)
    cfg.eval.dataset_cache = fix(cfg.eval.dataset_cache)
    cfg.eval.reference.results_dir = fix(cfg.eval.reference.results_dir)
    cfg.publish.local_dir = fix(cfg.publish.local_dir)
    cfg.work_dir = fix(cfg.work_dir)
    return cfg


def parse_release(data: Any, *, path: Path | str = "<config>") -> ReleaseConfig:
    """Validate an already-loaded mapping as a release config.

    Raises:
        ConfigError: with one ``(field, reason)`` per problem, the file named in the message.
    """
    path = Path(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a release config must be a YAML mapping",
            path=str(path),
            errors=[("(top level)", "must be a mapping")],
        )
    data = dict(data)
    data.setdefault("name", path.stem)
    try:
        cfg = ReleaseConfig.model_validate(data)
    except ValidationError as err:
        errors = _format_errors(str(path), err)
        lines = "\n".join(f"  {path}: {field}: {msg}" for field, msg in errors)
        raise ConfigError(
            f"{path}: {len(errors)} error(s) in release config:\n{lines}",
            path=str(path),
            errors=errors,
            model=str(data.get("name")),
        ) from err
    return _resolve_paths(cfg, path.parent.resolve())


def load_release(path: Path | str) -> ReleaseConfig:
    """Load and validate a release config file.

    Args:
        path: the YAML file.

    Returns:
        The validated config, relative paths resolved against the file's folder.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such release config file", path=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{path}: not valid YAML: {err}", path=str(path), errors=[("(file)", "not valid YAML")]
        ) from err
    return parse_release(data, path=path)


def validate_files(paths: list[Path]) -> dict[Path, ConfigError | None]:
    """Validate each file; map it to its error, or None when it is valid."""
    out: dict[Path, ConfigError | None] = {}
    for p in paths:
        try:
            load_release(p)
            out[p] = None
        except ConfigError as err:
            out[p] = err
    return out
