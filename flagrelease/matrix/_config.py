"""Matrix configs: one model across many chips, one release config per chip.

A matrix file (``release_configs/matrices/<name>.yaml``) holds a ``release`` section -- a
release config without ``chip`` -- and, under ``chips``, each chip's overrides of it.  A
pair's release config is the base with its chip's overrides merged in: mappings merge
key by key, anything else (a list, a number, a string) replaces what the base says.
``{chip}``, ``{card_name}``, ``{vendor}``, ``{pair}`` and ``{matrix}`` in the base's and
the overrides' strings become the pair's values, so that per-chip names (image tags,
repos, work folders) need no copy.  A chip whose release already has a config file of
its own names it instead (``<chip>: {config: ../deepseek-r1-iluvatar.yaml}``).

A pair is named ``<matrix>-<chip>`` (or its overrides' ``name``) and is addressed as
``<matrix file>#<chip>`` wherever a release config path is taken:
:func:`flagrelease.config.load_release` loads it like any other config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flagrelease.chips import ChipProfile, list_chips, load_chip
from flagrelease.config import ReleaseConfig, S3Target, parse_release, read_config_file
from flagrelease.errors import ConfigError

__all__ = [
    "PAIR_SEPARATOR",
    "CollectionPublish",
    "CollectionSection",
    "Matrix",
    "MatrixConfig",
    "MatrixPair",
    "is_matrix_file",
    "load_matrix",
    "load_pair",
    "matrix_files",
    "split_pair_reference",
    "validate_matrix",
]

#: Separates the matrix file from the chip in a pair's config reference (``file.yaml#chip``).
PAIR_SEPARATOR = "#"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_PLACEHOLDER = re.compile(r"\{(chip|card_name|vendor|pair|matrix)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CollectionPublish(_Strict):
    """Where the collection card and the support table go (beside the pairs' bundles)."""

    local_dir: Path | None = Field(default=None, description="A folder; the pairs' local bundles may lie below it.")
    s3: S3Target | None = Field(default=None, description="A bucket and prefix; the pairs' prefixes may lie below it.")


class CollectionSection(_Strict):
    """The matrix's own output: the support table and the collection card."""

    title: str | None = Field(default=None, description="The card's title; default '<model> on FlagOS'.")
    publish: CollectionPublish = Field(default_factory=CollectionPublish)
    work_dir: Path | None = Field(default=None, description="Where they are built; default below the home folder.")


class MatrixConfig(_Strict):
    """One model across many chips: a base release config and each chip's overrides."""

    name: str = Field(description="Matrix name; defaults to the file stem.")
    description: str = ""
    release: dict[str, Any] = Field(description="The release config every pair starts from, without `chip`.")
    chips: dict[str, dict[str, Any] | None] = Field(description="chip profile -> overrides of `release`.")
    collection: CollectionSection = Field(default_factory=CollectionSection)
    work_pool: str = Field(
        default="flagrelease-matrix",
        description="Prefect work pool of the matrix flow itself (it only starts and waits for the pairs).",
    )
    schedule: str | None = Field(default=None, description="Cron schedule of the matrix deployment.")
    tags: list[str] = Field(default_factory=list)

    @field_validator("name", "work_pool")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits, '.', '_' and '-'")
        return value

    @field_validator("release")
    @classmethod
    def _no_chip(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("chip", "name"):
            if key in value:
                raise ValueError(f"`{key}` is set per pair (by its key under `chips`), not in `release`")
        return value

    @field_validator("chips")
    @classmethod
    def _chips(cls, value: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any] | None]:
        if not value:
            raise ValueError("a matrix needs at least one chip")
        known = list_chips()
        for chip, overrides in value.items():
            if chip not in known:
                raise ValueError(f"unknown chip {chip!r}; known chips: {', '.join(known)}")
            if overrides and "chip" in overrides:
                raise ValueError(f"chips.{chip}: `chip` is the key itself; remove it from the overrides")
            if overrides and "config" in overrides and (len(overrides) > 1 or not isinstance(overrides["config"], str)):
                raise ValueError(
                    f"chips.{chip}: `config` names the pair's own release config file; give it alone, "
                    "with no overrides beside it"
                )
        return value


@dataclass(frozen=True)
class MatrixPair:
    """One model x chip pair of a matrix.

    Attributes:
        chip: the chip profile name.
        config: the pair's release config (base and overrides merged, paths resolved).
        reference: how to address it as a config path (``<matrix file>#<chip>``).
    """

    chip: str
    config: ReleaseConfig
    reference: str

    @property
    def name(self) -> str:
        """The pair's release name (``<matrix>-<chip>`` unless its overrides name it)."""
        return self.config.name

    @property
    def profile(self) -> ChipProfile:
        """The pair's chip profile."""
        return load_chip(self.chip)

    @property
    def deployment(self) -> str:
        """Its ``flagrelease/<deployment>``: the release name, or the file stem of a config of its own."""
        return self.config.name if split_pair_reference(self.reference) else Path(self.reference).stem


@dataclass(frozen=True)
class Matrix:
    """A loaded matrix: its config, its file and its pairs, in file order."""

    config: MatrixConfig
    path: Path
    pairs: tuple[MatrixPair, ...]

    @property
    def name(self) -> str:
        """The matrix name."""
        return self.config.name

    def pair(self, chip: str) -> MatrixPair:
        """The pair of ``chip``.

        Raises:
            ConfigError: the matrix has no such chip (the message lists its chips).
        """
        for p in self.pairs:
            if p.chip == chip:
                return p
        raise ConfigError(
            f"matrix {self.name} has no chip {chip!r}; its chips: {', '.join(p.chip for p in self.pairs)}",
            path=str(self.path),
            chip=chip,
        )

    @property
    def model_name(self) -> str:
        """The model's display name (the first pair's)."""
        return self.pairs[0].config.model.name

    @property
    def title(self) -> str:
        """The collection card's title."""
        return self.config.collection.title or f"{self.model_name} on FlagOS"

    @property
    def work_dir(self) -> Path:
        """Where the support table and collection card are built."""
        from flagrelease.constants import home_dir

        return (self.config.collection.work_dir or home_dir() / "matrices" / self.name).resolve()


# -- expansion --------------------------------------------------------------------------------------
def _merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key, anything else replaced."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return over


def _substitute(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, Mapping):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


def split_pair_reference(reference: Path | str) -> tuple[Path, str] | None:
    """``(matrix file, chip)`` of a pair reference ``<file>#<chip>``, None for a plain path."""
    text = str(reference)
    if PAIR_SEPARATOR not in Path(text).name:
        return None
    file, _, chip = text.rpartition(PAIR_SEPARATOR)
    return Path(file), chip


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such matrix file", path=str(path))
    data = read_config_file(path)  # bounded: size, depth, aliases, duplicate keys, UTF-8
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a matrix must be a YAML mapping", path=str(path), errors=[("(top level)", "must be a mapping")]
        )
    return data


def _parse_matrix(data: dict[str, Any], path: Path) -> MatrixConfig:
    data = dict(data)
    data.setdefault("name", path.stem)
    try:
        cfg = MatrixConfig.model_validate(data)
    except ValidationError as err:
        errors = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown field (a matrix has name, description, release, chips, collection, work_pool, ...)"
            elif e["type"] == "missing":
                msg = "required field is missing"
            errors.append((loc, msg))
        lines = "\n".join(f"  {path}: {f}: {m}" for f, m in errors)
        raise ConfigError(f"{path}: {len(errors)} error(s) in matrix:\n{lines}", path=str(path), errors=errors) from err
    base = path.parent.resolve()
    collection = cfg.collection
    fixed = {
        "local_dir": _resolved(collection.publish.local_dir, base),
        "work_dir": _resolved(collection.work_dir, base),
    }
    return cfg.model_copy(
        update={
            "collection": collection.model_copy(
                update={
                    "publish": collection.publish.model_copy(update={"local_dir": fixed["local_dir"]}),
                    "work_dir": fixed["work_dir"],
                }
            )
        }
    )


def _resolved(p: Path | None, base: Path) -> Path | None:
    return p if p is None or p.is_absolute() else (base / p).resolve()


def _own_config(path: Path, chip: str, file: str) -> MatrixPair:
    """A pair whose release config is a file of its own (``chips: {<chip>: {config: FILE}}``)."""
    from flagrelease.config import load_release

    target = Path(file)
    target = target if target.is_absolute() else (path.parent / target)
    cfg = load_release(target)
    if cfg.chip != chip:
        raise ConfigError(
            f"{path}: chips.{chip}.config: {file} releases on {cfg.chip}, not {chip}",
            path=str(path),
            errors=[(f"chips.{chip}.config", f"{file} is a release on {cfg.chip}")],
            chip=chip,
        )
    return MatrixPair(chip=chip, config=cfg, reference=str(target))


def _pair(cfg: MatrixConfig, path: Path, chip: str) -> MatrixPair:
    profile = load_chip(chip)
    overrides = dict(cfg.chips[chip] or {})
    if "config" in overrides:
        return _own_config(path, chip, str(overrides["config"]))
    name = str(overrides.pop("name", f"{cfg.name}-{chip}"))
    values = {"chip": chip, "card_name": profile.card_name, "vendor": profile.vendor, "pair": name, "matrix": cfg.name}
    data = _substitute(_merge(cfg.release, overrides), values)
    data.update(chip=chip, name=name)
    data["tags"] = sorted({*(data.get("tags") or []), *cfg.tags, f"matrix:{cfg.name}"})
    reference = f"{path}{PAIR_SEPARATOR}{chip}"
    return MatrixPair(chip=chip, config=parse_release(data, path=Path(reference)), reference=reference)


def _cross_checks(pairs: list[MatrixPair], cfg: MatrixConfig, path: Path) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if pairs:
        model = (pairs[0].config.model.repo_id, pairs[0].config.model.revision)
        for p in pairs[1:]:
            if (p.config.model.repo_id, p.config.model.revision) != model:
                errors.append(
                    (
                        f"chips.{p.chip}.model",
                        f"{p.config.model.repo_id}@{p.config.model.revision} is not the matrix's model "
                        f"{model[0]}@{model[1]}; a matrix releases one model",
                    )
                )
    seen: dict[str, str] = {}
    for p in pairs:
        if p.name in seen:
            errors.append((f"chips.{p.chip}.name", f"{p.name!r} is also the name of the {seen[p.name]} pair"))
        seen[p.name] = p.chip
    for kind, get in (
        ("work_dir", lambda c: c.work_dir),
        ("publish.local_dir", lambda c: c.publish.local_dir),
        ("publish.s3", lambda c: (c.publish.s3.bucket, c.publish.s3.prefix) if c.publish.s3 else None),
    ):
        owners: dict[Any, str] = {}
        for p in pairs:
            value = get(p.config)
            if value is None:
                continue
            if value in owners:
                errors.append(
                    (
                        f"chips.{p.chip}.{kind}",
                        f"the same as the {owners[value]} pair's; put {{pair}} or {{chip}} in it so that each pair "
                        "has its own",
                    )
                )
            owners[value] = p.chip
    coll = cfg.collection.publish
    for p in pairs:
        if coll.local_dir is not None and p.config.publish.local_dir == coll.local_dir:
            errors.append(
                ("collection.publish.local_dir", f"is the {p.chip} pair's publish folder; use the folder above it")
            )
        s3 = p.config.publish.s3
        if coll.s3 is not None and s3 is not None and (s3.bucket, s3.prefix) == (coll.s3.bucket, coll.s3.prefix):
            errors.append(("collection.publish.s3", f"is the {p.chip} pair's S3 prefix; use the prefix above it"))
    return errors


def validate_matrix(path: Path | str) -> dict[str, ConfigError | None]:
    """Validate a matrix file and each of its pairs.

    Returns:
        ``{path: error or None}`` for the matrix itself, then ``{path#chip: error or None}``
        for each pair (only the matrix's entry when the matrix itself is invalid).
    """
    path = Path(path)
    out: dict[str, ConfigError | None] = {}
    try:
        cfg = _parse_matrix(_read(path), path)
    except ConfigError as err:
        return {str(path): err}
    pairs = []
    pair_errors: dict[str, ConfigError | None] = {}
    for chip in cfg.chips:
        ref = f"{path}{PAIR_SEPARATOR}{chip}"
        try:
            pairs.append(_pair(cfg, path, chip))
            pair_errors[ref] = None
        except ConfigError as err:
            pair_errors[ref] = err
    cross = _cross_checks(pairs, cfg, path)
    out[str(path)] = (
        ConfigError(
            f"{path}: {len(cross)} error(s) across the matrix's pairs:\n"
            + "\n".join(f"  {path}: {f}: {m}" for f, m in cross),
            path=str(path),
            errors=cross,
        )
        if cross
        else None
    )
    out.update(pair_errors)
    return out


def load_matrix(path: Path | str) -> Matrix:
    """Load a matrix file and expand its pairs.

    Args:
        path: the matrix YAML file.

    Returns:
        The matrix with each pair's validated release config.

    Raises:
        ConfigError: the matrix or any pair is invalid; ``errors`` holds every
            ``(field, reason)``, fields of a pair prefixed with ``<chip>:``.
    """
    path = Path(path)
    results = validate_matrix(path)
    bad = {ref: err for ref, err in results.items() if err is not None}
    if bad:
        errors = [
            (f"{split[1]}: {f}" if (split := split_pair_reference(ref)) else f, m)
            for ref, err in bad.items()
            for f, m in (err.errors or [("(file)", err.message)])
        ]
        raise ConfigError("\n".join(err.message for err in bad.values()), path=str(path), errors=errors)
    cfg = _parse_matrix(_read(path), path)
    return Matrix(config=cfg, path=path.resolve(), pairs=tuple(_pair(cfg, path.resolve(), c) for c in cfg.chips))


def load_pair(reference: Path | str) -> ReleaseConfig:
    """The release config of one pair, addressed as ``<matrix file>#<chip>``.

    Raises:
        ConfigError: the reference is not of that form, the matrix or the pair is
            invalid, or the matrix has no such chip.
    """
    split = split_pair_reference(reference)
    if split is None:
        raise ConfigError(f"{reference}: a matrix pair is addressed as <matrix file>#<chip>", path=str(reference))
    path, chip = split
    cfg = _parse_matrix(_read(path), path)
    if chip not in cfg.chips:
        raise ConfigError(
            f"{path}: the matrix has no chip {chip!r}; its chips: {', '.join(cfg.chips)}",
            path=str(path),
            errors=[("chips", f"no chip {chip!r}")],
            chip=chip,
        )
    return _pair(cfg, path.resolve(), chip).config


def is_matrix_file(path: Path) -> bool:
    """Whether ``path`` is a matrix file (a mapping with ``chips`` and ``release``), not a release config."""
    try:
        data = read_config_file(path)
    except ConfigError:
        return False
    return isinstance(data, dict) and "chips" in data and "release" in data


def matrix_files(config_dir: Path) -> list[Path]:
    """The matrix files of a release config folder: ``<config_dir>/matrices/*.yaml``, sorted."""
    return sorted((config_dir / "matrices").glob("*.yaml"))
