"""Reading release config files, with errors that name the file and each bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from pydantic import (
    ValidationError,
)

from flagrelease._redact import find_secret, redact
from flagrelease.config._release import (
    ReleaseConfig,
)
from flagrelease.config._yaml import read_yaml
from flagrelease.errors import ConfigError

__all__ = ["load_release", "parse_release", "validate_files"]


def _format_errors(path: str, err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p)[:64] for p in e["loc"]) or "(top level)"
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
            and str(bad).lower() not in msg.lower()
        ):
            shown = repr(bad) if len(repr(bad)) <= 80 else repr(bad)[:77] + "..."
            msg = f"{msg} (got {shown})"
        out.append((loc, redact(msg)))
    return out


_SECRET_FIX = (
    "a secret never goes into a release config, which is copied into scripts, images, cards and published "
    "bundles. Give it by reference instead: in serve.envs write `NAME: {secret: NAME}` and set NAME in the "
    "environment of the run (or a Prefect Secret block); hub and storage credentials are read from HF_TOKEN, "
    "MODELSCOPE_API_TOKEN and AWS_* in the environment"
)


def _secret_findings(data: Any, where: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """``(field, reason)`` for every string in ``data`` shaped like a secret; the value is never echoed."""
    found: list[tuple[str, str]] = []
    if depth > 64:
        return found
    if isinstance(data, str):
        kind = find_secret(data)
        if kind:
            found.append((where or "(top level)", f"holds what looks like {kind}; {_SECRET_FIX}"))
    elif isinstance(data, dict):
        for key, value in data.items():
            found += _secret_findings(key, where or "(top level)", depth + 1)
            found += _secret_findings(value, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(data, list | tuple):
        for i, item in enumerate(data):
            found += _secret_findings(item, f"{where}[{i}]", depth + 1)
    return found


def _raise(path: Path, errors: list[tuple[str, str]], name: object) -> NoReturn:
    lines = "\n".join(f"  {path}: {field}: {msg}" for field, msg in errors)
    raise ConfigError(
        f"{path}: {len(errors)} error(s) in release config:\n{lines}",
        path=str(path),
        errors=errors,
        model=str(name),
    )


def _resolve_paths(cfg: ReleaseConfig, base: Path) -> ReleaseConfig:
    """Resolve relative paths in the config against the config file's folder."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    cfg.model.path = fix(cfg.model.path)
    cfg.eval.include_path = fix(cfg.eval.include_path)
    cfg.eval.dataset_cache = fix(cfg.eval.dataset_cache)
    cfg.eval.reference.results_dir = fix(cfg.eval.reference.results_dir)
    cfg.eval.reference.scores = fix(cfg.eval.reference.scores)
    cfg.publish.local_dir = fix(cfg.publish.local_dir)
    cfg.work_dir = fix(cfg.work_dir)
    return cfg


def parse_release(data: Any, *, path: Path | str = "<config>", check_engine_args: bool = True) -> ReleaseConfig:
    """Validate an already-loaded mapping as a release config.

    Args:
        data: the mapping (a YAML document).
        path: the file it came from, for messages and relative paths.
        check_engine_args: also check the engine args against the argument parser of the
            vLLM that serves them (:func:`engine_arg_problems`).

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
    secrets = _secret_findings(data)
    try:
        cfg = ReleaseConfig.model_validate(data)
    except ValidationError as err:
        errors = secrets + [e for e in _format_errors(str(path), err) if e[0] not in {f for f, _ in secrets}]
        _raise(path, errors, data.get("name"))
    if secrets:
        _raise(path, secrets, data.get("name"))
    if check_engine_args:
        from flagrelease.config._engine_check import engine_arg_problems

        problems = engine_arg_problems(cfg)
        if problems:
            _raise(path, problems, data.get("name"))
    return _resolve_paths(cfg, path.parent.resolve())


def load_release(path: Path | str) -> ReleaseConfig:
    """Load and validate a release config file.

    Args:
        path: the YAML file, or a pair of a matrix as ``<matrix file>#<chip>``.

    Returns:
        The validated config, relative paths resolved against the file's folder.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file() and "#" in path.name:
        # A pair of a matrix (release_configs/matrices/), addressed as <matrix file>#<chip>.
        from flagrelease.matrix import load_pair

        return load_pair(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such release config file", path=str(path), errors=[("(file)", "no such file")])
    return parse_release(read_yaml(path), path=path)


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
