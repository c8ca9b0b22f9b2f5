"""The stage contract, and a plain-Python runner for the whole pipeline.

Each stage module exposes ``run_stage(ctx) -> StageResult``.  Prefect tasks (in
``tasks/``) wrap exactly these functions; :func:`run_pipeline` runs them in order without
Prefect, keeping each stage's result in ``state/<stage>.json`` so that a re-run skips
stages whose inputs have not changed and a failed run resumes at the stage that failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

from pydantic import BaseModel, ConfigDict, ValidationError

from flagrelease import __version__
from flagrelease._atomic import atomic_write_json
from flagrelease._redact import redact_obj
from flagrelease.chips import ChipProfile
from flagrelease.config import ReleaseConfig
from flagrelease.errors import ConfigError
from flagrelease.layout import BundleLayout

__all__ = [
    "HOOKS",
    "STAGES",
    "STAGE_INPUTS",
    "ProgressFn",
    "ReleaseContext",
    "StageOutputs",
    "StageResult",
    "load_stage_result",
    "run_pipeline",
    "stage_fingerprint",
    "stage_function",
    "stage_inputs",
]

log = logging.getLogger("flagrelease.pipeline")

#: The stages, in order, and the module that owns each.
STAGES: tuple[str, ...] = ("fetch", "convert", "image", "deploy", "eval", "gate", "card", "publish")
_MODULES = {s: f"flagrelease.{s}" for s in STAGES} | {"eval": "flagrelease.evaluate"}

#: The stages whose results each stage depends on (:func:`stage_inputs` drops the image
#: from the serving stages' on the local runtime).  The image renders the path the
#: convert writes to, not what it writes, so it needs no stage; the eval and the gate
#: serve the weights the fetch and the convert made, after the deploy.  A stage's
#: fingerprint covers its inputs; a flow may start a stage as soon as they are done (the
#: image from the start, beside the fetch, the convert and, on the local runtime, the rest).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "fetch": (),
    "convert": ("fetch",),
    "image": (),
    "deploy": ("fetch", "convert", "image"),
    "eval": ("fetch", "convert", "image", "deploy"),
    "gate": ("fetch", "convert", "image", "deploy", "eval"),
    "card": STAGES[: STAGES.index("card")],
    "publish": STAGES[: STAGES.index("publish")],
}


def stage_inputs(cfg: ReleaseConfig, stage: str) -> tuple[str, ...]:
    """The stages ``stage`` depends on for this release (:data:`STAGE_INPUTS`).

    The stages that serve the model (deploy, eval, gate) on the local runtime (this
    machine's serving venv) do not run the image, so they do not wait for it; in a
    container, or on nodes that run it, they do.
    """
    from flagrelease.config import RuntimeKind

    inputs = STAGE_INPUTS[stage]
    if stage in ("deploy", "eval", "gate") and cfg.runtime is RuntimeKind.LOCAL:
        inputs = tuple(s for s in inputs if s != "image")
    return inputs


#: Hooks: functions one stage lends the others, by name -> ``module:attribute``.  Resolved
#: here, by :meth:`ReleaseContext.hook`, so that no stage package imports another's code:
#: serving a model and one load-test level (deploy), and evaluating the target with some
#: FlagGems operators excluded (eval; the gate's bisection runs it).
HOOKS: dict[str, str] = {
    "serving": "flagrelease.deploy:serving",
    "load_test": "flagrelease.deploy.loadtest:run_load_test",
    "flaggems_trial": "flagrelease.evaluate:flaggems_trial",
}

#: Which parts of the config each stage's output depends on (besides upstream results).
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "fetch": ("model",),
    "convert": ("model", "convert"),
    "image": ("chip", "image", "model", "serve"),
    "deploy": ("chip", "serve"),
    "eval": ("chip", "serve", "eval"),
    "gate": ("eval", "gates"),
    "card": ("name", "description", "model", "chip", "image", "serve", "eval", "gates", "publish", "convert"),
    "publish": ("publish", "gates"),
}


class ProgressFn(Protocol):
    """Reports progress: ``fraction`` in [0, 1] and a short message."""

    def __call__(self, stage: str, fraction: float, message: str = "") -> None: ...


def _no_progress(stage: str, fraction: float, message: str = "") -> None:
    return None


class StageOutputs(BaseModel):
    """Base of each stage's typed outputs (``FetchOutputs``, ``ConvertOutputs``, ...).

    A stage declares its outputs as a subclass in its package's ``outputs.py``; a
    downstream stage reads them with ``ctx.result("convert", ConvertOutputs)`` and never
    imports the upstream stage's modules.  Stored in ``state/<stage>.json`` as JSON.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


_O = TypeVar("_O", bound=StageOutputs)


@dataclass
class StageResult:
    """What a stage did, in JSON-able form.

    Attributes:
        stage: the stage name.
        summary: one or two sentences of Markdown for people (artifact, logs).
        outputs: JSON-able facts later stages and the manifest use.
        tables: named tables (lists of row dicts) shown as Prefect table artifacts.
        status: ``ok``, ``skipped`` (nothing to do), ``warning`` or ``failed`` (a gate verdict).
        fingerprint: the input fingerprint this result was computed for.
    """

    stage: str
    summary: str
    outputs: dict[str, Any] | StageOutputs = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    status: str = "ok"
    fingerprint: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.outputs, StageOutputs):
            self.outputs = self.outputs.model_dump(mode="json")

    def typed(self, kind: type[_O]) -> _O:
        """The outputs as ``kind`` (the stage's ``outputs.py`` model).

        Raises:
            ConfigError: the saved outputs do not fit ``kind`` (a result saved by another
                flagrelease version); the message says how to redo the stage.
        """
        try:
            return kind.model_validate(self.outputs)
        except ValidationError as err:
            raise ConfigError(
                f"the saved result of stage {self.stage!r} does not fit {kind.__name__} ({err.error_count()} "
                f"error(s), first: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}); it was written by another "
                f"flagrelease version: re-run it (flagrelease run CONFIG --stages {self.stage} --force)",
                stage=self.stage,
            ) from err

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-able dict, secrets redacted."""
        return redact_obj(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageResult:
        """Rebuild a result saved by :meth:`to_json`."""
        return cls(**data)


@dataclass
class ReleaseContext:
    """Everything a stage needs: the config, chip, layout and upstream results."""

    config: ReleaseConfig
    layout: BundleLayout
    config_path: Path | None = None
    dry_run: bool = False
    results: dict[str, StageResult] = field(default_factory=dict)
    progress: ProgressFn = _no_progress
    options: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def hook(self, name: str) -> Callable[..., Any]:
        """A function another stage lends (:data:`HOOKS`); ``hooks`` overrides it (tests, benchmarks).

        Raises:
            ConfigError: the name is unknown (the message lists the hooks).
        """
        if name in self.hooks:
            return self.hooks[name]
        if name not in HOOKS:
            raise ConfigError(f"unknown hook {name!r}; hooks: {', '.join(sorted(HOOKS))}")
        module, _, attr = HOOKS[name].partition(":")
        fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
        return fn

    @property
    def chip(self) -> ChipProfile:
        """The release's chip profile."""
        return self.config.chip_profile

    @overload
    def result(self, stage: str) -> StageResult: ...

    @overload
    def result(self, stage: str, kind: type[_O]) -> _O: ...

    def result(self, stage: str, kind: type[_O] | None = None) -> StageResult | _O:
        """The result of an upstream stage, from memory or from ``state/``.

        Args:
            stage: the upstream stage's name.
            kind: its outputs model (``ConvertOutputs``, ...): return the typed outputs
                instead of the whole :class:`StageResult`.

        Raises:
            ConfigError: the stage has not run yet for this release, or its saved
                outputs do not fit ``kind``.
        """
        if stage not in self.results:
            loaded = load_stage_result(self.layout, stage)
            if loaded is None:
                raise ConfigError(
                    f"stage {stage!r} has not run for release {self.config.name!r}; run it first "
                    f"(flagrelease run CONFIG --stages {stage})",
                    model=self.config.name,
                    stage=stage,
                )
            self.results[stage] = loaded
        found = self.results[stage]
        return found if kind is None else found.typed(kind)

    @classmethod
    def create(
        cls,
        cfg: ReleaseConfig,
        *,
        config_path: Path | None = None,
        dry_run: bool = False,
        progress: ProgressFn | None = None,
        **options: Any,
    ) -> ReleaseContext:
        """A context for ``cfg`` with its default layout.

        An ``options["role"]`` of ``reference`` makes it the context of the release's
        reference side (:func:`flagrelease.evaluate.reference.release_for_role`).
        """
        from flagrelease.roles import release_for_role

        cfg = release_for_role(cfg, options.get("role"))
        return cls(
            config=cfg,
            layout=BundleLayout.for_release(cfg).ensure(),
            config_path=config_path,
            dry_run=dry_run,
            progress=progress or _no_progress,
            options=dict(options),
        )


def stage_function(stage: str) -> Callable[[ReleaseContext], StageResult]:
    """The ``run_stage`` function of ``stage``.

    Raises:
        ConfigError: the stage name is unknown (the message lists the stages).
    """
    if stage not in _MODULES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    module = importlib.import_module(_MODULES[stage])
    fn: Callable[[ReleaseContext], StageResult] = module.run_stage
    return fn


#: Shared code and templates (beyond the stage's own package) whose changes must
#: invalidate a stage's cached result. Paths are relative to the repo root.
_STAGE_CODE: dict[str, tuple[str, ...]] = {
    "fetch": ("flagrelease/tinymodel", "flagrelease/_filehash.py", "flagrelease/_safetensors.py"),
    "convert": ("flagrelease/_safetensors.py",),
    "image": (
        "flagrelease/render.py",
        "flagrelease/_oci.py",
        "flagrelease/services",
        "templates/docker",
        "templates/flagscale",
    ),
    "deploy": (
        "flagrelease/render.py",
        "flagrelease/runtime.py",
        "flagrelease/gems/vllm_plugin.py",
        "flagrelease/gems/oplib",
        "templates/flagscale",
    ),
    "eval": (
        "flagrelease/samples.py",
        "flagrelease/deploy",
        "flagrelease/data/lm_eval_tasks",
        "flagrelease/gems/vllm_plugin.py",
        "flagrelease/gems/oplib",
    ),
    "gate": ("flagrelease/samples.py",),
    "card": ("flagrelease/bundle.py", "flagrelease/render.py", "templates/card", "templates/flagscale"),
    "publish": ("flagrelease/bundle.py", "flagrelease/_filehash.py"),
}


def _code_digest(stage: str) -> str:
    from flagrelease.constants import REPO_ROOT

    # Found, not imported: a stage whose result is reused never loads its (heavy) code.
    spec = importlib.util.find_spec(_MODULES[stage])
    package = Path(spec.origin if spec is not None and spec.origin else "").parent
    files = sorted(f for f in package.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    for extra in _STAGE_CODE.get(stage, ()):
        target = REPO_ROOT / extra
        if target.is_dir():
            files += sorted(f for f in target.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        elif target.is_file():
            files.append(target)
        else:  # a stale entry would silently stop invalidating the cache
            raise FileNotFoundError(f"_STAGE_CODE[{stage!r}] names {extra}, which does not exist")
    h = hashlib.sha256(__version__.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_fingerprint(ctx: ReleaseContext, stage: str) -> str:
    """A content hash of what ``stage`` depends on: config sections, upstream results, code."""
    cfg = ctx.config.model_dump(mode="json")
    parts: dict[str, Any] = {
        "stage": stage,
        "config": {k: cfg.get(k) for k in _STAGE_SECTIONS[stage]},
        "chip": ctx.chip.model_dump(mode="json") if "chip" in _STAGE_SECTIONS[stage] else None,
        "code": _code_digest(stage),
        "options": {k: v for k, v in sorted(ctx.options.items()) if isinstance(v, str | int | float | bool)},
    }
    known = {s: ctx.results.get(s) or load_stage_result(ctx.layout, s) for s in stage_inputs(ctx.config, stage)}
    parts["upstream"] = {s: r.fingerprint for s, r in known.items() if r is not None}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def load_stage_result(layout: BundleLayout, stage: str) -> StageResult | None:
    """The saved result of ``stage``, or None."""
    path = layout.state_dir / f"{stage}.json"
    if not path.is_file():
        return None
    return StageResult.from_json(json.loads(path.read_text(encoding="utf-8")))


def save_stage_result(layout: BundleLayout, result: StageResult) -> Path:
    """Save ``result`` atomically under ``state/``."""
    return atomic_write_json(layout.state_dir / f"{result.stage}.json", result.to_json())


def execute_stage(ctx: ReleaseContext, stage: str, *, force: bool = False) -> StageResult:
    """Run one stage unless a saved result has the same fingerprint; save and return its result."""
    fingerprint = stage_fingerprint(ctx, stage)
    saved = load_stage_result(ctx.layout, stage)
    if not force and not ctx.dry_run and saved is not None and saved.fingerprint == fingerprint:
        log.info("%s: unchanged since its last run, reusing its result", stage)
        ctx.results[stage] = saved
        return saved
    log.info("%s: starting", stage)
    started = time.time()
    result = stage_function(stage)(ctx)
    result.fingerprint = fingerprint
    result.started_at, result.finished_at = started, time.time()
    if not ctx.dry_run:
        save_stage_result(ctx.layout, result)
    ctx.results[stage] = result
    log.info("%s: %s (%.1fs)", stage, result.summary, result.finished_at - started)
    return result


def run_pipeline(
    ctx: ReleaseContext, *, stages: Sequence[str] | None = None, force: bool = False
) -> dict[str, StageResult]:
    """Run ``stages`` (default: all) in pipeline order, without Prefect.

    Stages whose fingerprint matches their saved result are skipped.  The release's work
    folder is locked for the whole run (a dry run excepted): a second run of the same
    release refuses at once, naming this one.

    Returns:
        The result of each stage run or reused.

    Raises:
        BusyError: another process runs this release.
    """
    from flagrelease._lease import release_lock

    wanted = list(stages or STAGES)
    for s in wanted:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
    lock = contextlib.nullcontext() if ctx.dry_run else release_lock(ctx.layout.root, release=ctx.config.name)
    with lock:
        for stage in STAGES:
            if stage in wanted:
                execute_stage(ctx, stage, force=force)
    return {s: ctx.results[s] for s in wanted}
