"""The one pattern every stage task follows.

A stage task loads the release config, rebuilds the context from upstream results,
runs the library's ``run_stage`` through :func:`flagrelease.pipeline.execute_stage`, and
publishes what it did as Prefect artifacts (a Markdown summary, one table per result
table, a progress bar).  Caching is by content: the key is the stage's fingerprint
(config sections, upstream fingerprints, code), so a re-run with nothing changed does
no stage work and a failed run resumes at the stage that failed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from flagrelease._redact import RedactingFilter, redact, redact_obj
from flagrelease.config import load_release
from flagrelease.errors import ConfigError, PublishBlockedError
from flagrelease.pipeline import (
    ReleaseContext,
    StageResult,
    execute_stage,
    load_stage_result,
    stage_fingerprint,
)

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


def _cache_key(stage: str):  # type: ignore[no-untyped-def]
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        if parameters.get("dry_run") or parameters.get("force"):
            return None
        ctx = build_context(
            parameters["config"], parameters.get("upstream") or {}, dry_run=False, options=parameters.get("options")
        )
        fingerprint = stage_fingerprint(ctx, stage)
        saved = load_stage_result(ctx.layout, stage)
        # Only trust the cache while the stage's output is still on disk.
        if saved is None or saved.fingerprint != fingerprint:
            return None
        return f"flagrelease-{ctx.config.name}-{stage}-{fingerprint}"

    return key


class _Progress:
    """Feeds the library's progress callback into a Prefect progress artifact."""

    def __init__(self, release: str, stage: str) -> None:
        self.key = _artifact_key(release, stage, "progress")
        self.artifact_id = create_progress_artifact(0.0, key=self.key, description=f"{release}: {stage}")
        self.last = 0.0

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self.last < 2.0:
            return
        self.last = now
        update_progress_artifact(
            self.artifact_id, min(max(fraction, 0.0), 1.0) * 100.0, description=redact(message) or None
        )


def _publish_artifacts(ctx: ReleaseContext, result: StageResult) -> None:
    name, stage = ctx.config.name, result.stage
    lines = [f"## {stage}: {result.status}", "", redact(result.summary), ""]
    for key, value in redact_obj(result.outputs).items():
        if isinstance(value, str | int | float | bool) or value is None:
            lines.append(f"- **{key}**: `{value}`")
    create_markdown_artifact(
        "\n".join(lines), key=_artifact_key(name, stage), description=f"{name}: what the {stage} stage did"
    )
    for table, rows in result.tables.items():
        if rows:
            create_table_artifact(
                redact_obj(rows), key=_artifact_key(name, stage, table), description=f"{name}: {stage} / {table}"
            )


def _redact_prefect_logs() -> None:
    for logger_name in ("flagrelease", "prefect.task_runs", "prefect.flow_runs"):
        for handler in logging.getLogger(logger_name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


#: Failures a retry cannot mend: a bad config, or a release its gate refused.
_DETERMINISTIC = (ConfigError, PublishBlockedError)


def _retry_unless_deterministic(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect retry condition: retry transient failures, never a deterministic refusal."""
    return not isinstance(state.data, _DETERMINISTIC)


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
        logger = get_run_logger()
        ctx = build_context(config, upstream, dry_run=dry_run, options=options)
        ctx.progress = _Progress(ctx.config.name, stage)
        if prepare is not None:
            prepare(ctx)
        result = execute_stage(ctx, stage, force=force)
        ctx.progress(stage, 1.0, result.summary)
        _publish_artifacts(ctx, result)
        logger.info("%s: %s", stage, redact(result.summary))
        return result.to_json()

    run.__name__ = f"{stage}_stage"
    return task(
        run,
        name=stage,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=_retry_unless_deterministic,
        timeout_seconds=timeout_seconds,
        cache_key_fn=_cache_key(stage),
        cache_expiration=timedelta(days=30),
        persist_result=True,
        task_run_name=f"{stage}",
    )
