"""The one pattern every stage task follows.

A stage task loads the release config, rebuilds the context from upstream results,
runs the library's ``run_stage`` through :func:`flagrelease.pipeline.execute_stage`, and
publishes what it did as Prefect artifacts (a Markdown summary, one table per result
table, a progress bar).  Caching is by content: the key is the stage's fingerprint
(config sections, upstream fingerprints, code), so a re-run with nothing changed does
no stage work and a failed run resumes at the stage that failed.  A reused stage still
runs its task, which says in its artifacts that this run reused it.  A stage that
serves the model holds its nodes' concurrency slots while it runs (:mod:`tasks._limits`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from flagrelease._redact import RedactingFilter, redact, redact_obj
from flagrelease.config import load_release
from flagrelease.pipeline import (
    ReleaseContext,
    StageResult,
    execute_stage,
    load_stage_result,
    stage_fingerprint,
)
from flagrelease.retry import classify
from tasks import _secrets  # noqa: F401  (registers the Prefect Secret block resolver)
from tasks._background import later
from tasks._limits import hold_accelerators

__all__ = ["build_context", "stage_task"]


def _artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def build_context(
    config: str, upstream: dict[str, dict[str, Any]], *, dry_run: bool, options: dict[str, Any] | None = None
) -> ReleaseContext:
    """The library context for a task: config, layout and upstream results."""
    cfg = load_release(Path(config))
    ctx = ReleaseContext.create(cfg, config_path=Path(config), dry_run=dry_run, **(options or {}))
    for name, data in upstream.items():
        ctx.results[name] = StageResult.from_json(data)
    return ctx


def _reusable(ctx: ReleaseContext, stage: str, *, force: bool) -> StageResult | None:
    """The saved result ``execute_stage`` will reuse (same fingerprint, output still on disk), else None."""
    if force or ctx.dry_run:
        return None
    saved = load_stage_result(ctx.layout, stage)
    return saved if saved is not None and saved.fingerprint == stage_fingerprint(ctx, stage) else None


class _Progress:
    """Feeds the library's progress callback into a Prefect progress artifact (made at the first report)."""

    def __init__(self, release: str, stage: str) -> None:
        self.key = _artifact_key(release, stage, "progress")
        self.description = f"{release}: {stage}"
        self.artifact_id: Any = None
        self.last = 0.0

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self.last < 2.0:
            return
        self.last = now
        value = min(max(fraction, 0.0), 1.0) * 100.0
        if self.artifact_id is None:
            described = f"{self.description}: {redact(message)}" if message else self.description
            self.artifact_id = create_progress_artifact(value, key=self.key, description=described)
            return
        update_progress_artifact(self.artifact_id, value, description=redact(message) or None)


def _reused_note(result: StageResult) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result.finished_at)) if result.finished_at else "?"
    return (
        f"**Reused**: nothing this stage depends on changed since its run of {when}, so this run did no "
        f"{result.stage} work{' and uploaded nothing' if result.stage == 'publish' else ''}. That run:"
    )


def _publish_artifacts(ctx: ReleaseContext, result: StageResult, *, reused: bool = False) -> None:
    name, stage = ctx.config.name, result.stage
    status = f"{result.status} (reused)" if reused else result.status
    lines = [f"## {stage}: {status}", ""]
    lines += [_reused_note(result), ""] if reused else []
    lines += [redact(result.summary), ""]
    for key, value in redact_obj(result.outputs).items():
        if isinstance(value, str | int | float | bool) or value is None:
            lines.append(f"- **{key}**: `{value}`")
    # Created in the background (tasks._background): the flow waits for them before it ends.
    later(
        create_markdown_artifact,
        "\n".join(lines),
        key=_artifact_key(name, stage),
        description=f"{name}: what the {stage} stage did",
    )
    for table, rows in result.tables.items():
        if rows:
            later(
                create_table_artifact,
                redact_obj(rows),
                key=_artifact_key(name, stage, table),
                description=f"{name}: {stage} / {table}",
            )


def _redact_prefect_logs() -> None:
    for logger_name in ("flagrelease", "prefect.task_runs", "prefect.flow_runs"):
        for handler in logging.getLogger(logger_name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def _retry_unless_deterministic(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect retry condition: retry what a retry can fix (:func:`flagrelease.retry.classify`), nothing else."""
    err = state.data
    if not isinstance(err, BaseException):
        return True  # no exception to judge (a crash of the task's process): worth another attempt
    verdict, why = classify(err)
    logging.getLogger("flagrelease.retry").info(
        "%s failed: %s (%s): %s", task.name, type(err).__name__, why, "retrying" if verdict == "transient" else "final"
    )
    return verdict == "transient"


def stage_task(
    stage: str,
    *,
    retries: int = 0,
    retry_delay_seconds: float = 10,
    timeout_seconds: float | None = None,
    prepare: Callable[[ReleaseContext], None] | None = None,
) -> Task[..., dict[str, Any]]:
    """Build the Prefect task that runs ``stage``.

    Args:
        stage: the pipeline stage.
        retries: how many times Prefect retries a failed run.
        retry_delay_seconds: wait between retries.
        timeout_seconds: hard limit for one attempt.
        prepare: called with the context before the stage runs, e.g. to resolve
            Prefect Secret blocks into ``ctx.options`` (never into task parameters,
            which Prefect stores).

    Returns:
        A task taking ``(config, upstream, dry_run, force, options)`` and returning the
        stage result as JSON.
    """

    def run(
        config: str,
        upstream: dict[str, dict[str, Any]],
        dry_run: bool = False,
        force: bool = False,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        _redact_prefect_logs()
        ctx = build_context(config, upstream, dry_run=dry_run, options=options)
        ctx.progress = _Progress(ctx.config.name, stage)
        reused = _reusable(ctx, stage, force=force) is not None
        if prepare is not None and not reused:
            prepare(ctx)
        # A stage that serves the model holds its nodes' accelerators (flagrelease.limits).
        with contextlib.nullcontext() if reused or ctx.dry_run else hold_accelerators(ctx.config, stage):
            result = execute_stage(ctx, stage, force=force)
        if not reused:  # a reused stage made no progress: its bar stays the run's that made it
            ctx.progress(stage, 1.0, result.summary)
        _publish_artifacts(ctx, result, reused=reused)
        # The summary is logged once, by execute_stage (the flagrelease logger reaches the run page).
        return result.to_json()

    run.__name__ = f"{stage}_stage"
    return task(
        run,
        name=stage,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=_retry_unless_deterministic,
        timeout_seconds=timeout_seconds,
        # The stage's own fingerprint decides reuse (execute_stage), so that a reused stage
        # still runs its task and says so in its artifacts; Prefect's cache would skip both.
        cache_policy=NO_CACHE,
        persist_result=True,
        task_run_name=f"{stage}",
    )
