"""The ``flagrelease`` flow: one run releases one model on one chip.

The flow only chains the stage tasks in order; each task is cached by content, so a
re-run with nothing changed does no stage work, and a failed run resumes at the stage
that failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flagrelease.config import load_release
from flagrelease.constants import REPO_ROOT, release_configs_dir
from flagrelease.errors import ConfigError
from flagrelease.pipeline import STAGES, StageResult
from flagrelease.roles import release_for_role
from tasks import STAGE_TASKS
from tasks.reference import reference

__all__ = ["flagrelease", "resolve_config", "run_demo", "run_release"]

DEMO_CONFIG = "demo-tiny-cpu"


def resolve_config(config: str) -> Path:
    """Resolve a release name (``deepseek-r1-iluvatar``) or a path to a config file.

    Raises:
        ConfigError: nothing matches; the message lists the known releases.
    """
    candidates = [Path(config), REPO_ROOT / config, release_configs_dir() / f"{config}.yaml"]
    for path in candidates:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return path.resolve()
    known = sorted(p.stem for p in release_configs_dir().glob("*.yaml"))
    raise ConfigError(f"no release config {config!r}; known releases: {', '.join(known)}")


def _summary_markdown(name: str, results: dict[str, dict[str, Any]]) -> str:
    rows = ["| stage | status | summary |", "| --- | --- | --- |"]
    for stage, data in results.items():
        summary = str(data.get("summary", "")).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {stage} | {data.get('status')} | {summary} |")
    return f"# Release {name}\n\n" + "\n".join(rows) + "\n"


@flow(
    name="flagrelease",
    description="Release one model on one chip: fetch, convert, image, deploy, eval, gate, card, publish.",
    persist_result=True,
    log_prints=True,
)
def flagrelease(
    config: str,
    stages: list[str] | None = None,
    dry_run: bool = False,
    force: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the release described by ``config`` (a release name or a config file path).

    Args:
        config: release name in release_configs/ or a path to a release config.
        stages: run only these stages (default: all, in order).
        dry_run: plan every stage without side effects.
        force: ignore cached stage results.
        options: extra stage options (e.g. ``{"variants": "target"}``).

    Returns:
        Each stage's result as JSON.
    """
    logger = get_run_logger()
    path = resolve_config(config)
    options = dict(options or {})
    release = load_release(path)
    cfg = release_for_role(release, options.get("role"))
    wanted = [s for s in STAGES if not stages or s in stages]
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    logger.info("release %s: %s on %s, stages %s", cfg.name, cfg.model.repo_id, cfg.chip, ", ".join(wanted))
    results: dict[str, dict[str, Any]] = {}
    for stage in wanted:
        if stage == "eval" and cfg is release and release.remote_reference and not dry_run:
            results["reference"] = reference(str(path), force=force)
        results[stage] = STAGE_TASKS[stage](
            str(path), {k: v for k, v in results.items() if k in STAGES}, dry_run=dry_run, force=force, options=options
        )
    create_markdown_artifact(
        _summary_markdown(cfg.name, results),
        key=f"release-{cfg.name}".replace(".", "-").replace("_", "-"),
        description=f"{cfg.name}: release summary",
    )
    return results


def run_release(
    config: Path | str,
    *,
    stages: list[str] | None = None,
    dry_run: bool = False,
    force: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, StageResult]:
    """Run the flow in this process (Prefect's API, or an ephemeral server) and return stage results."""
    out = flagrelease(str(config), stages=stages, dry_run=dry_run, force=force, options=options)
    return {s: StageResult.from_json(d) for s, d in out.items()}


def run_demo(*, use_prefect: bool = True, force: bool = False) -> Path:
    """Release the generated tiny model on this CPU, end to end; return the card's path."""
    from flagrelease.layout import BundleLayout
    from flagrelease.pipeline import ReleaseContext, run_pipeline

    path = resolve_config(DEMO_CONFIG)
    cfg = load_release(path)
    if use_prefect:
        run_release(path, force=force)
    else:
        run_pipeline(ReleaseContext.create(cfg, config_path=path), force=force)
    card = BundleLayout.for_release(cfg).card_path
    if cfg.publish.local_dir:
        published = cfg.publish.local_dir / "README.md"
        if published.is_file():
            return published
    return card
