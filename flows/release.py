"""The ``flagrelease`` flow: one run releases one model on one chip.

The flow only chains the stage tasks in order; each task is cached by content, so a
re-run with nothing changed does no stage work, and a failed run resumes at the stage
that failed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.states import State

from flagrelease._lease import release_lock
from flagrelease.config import ReleaseConfig, load_release
from flagrelease.constants import REPO_ROOT, release_configs_dir
from flagrelease.errors import ConfigError
from flagrelease.layout import BundleLayout
from flagrelease.pipeline import STAGES, StageResult, stage_inputs
from flagrelease.roles import release_for_role
from tasks import STAGE_TASKS
from tasks._background import flush as flush_artifacts
from tasks.reference import reference

__all__ = ["flagrelease", "resolve_config", "run_demo", "run_release"]

DEMO_CONFIG = "demo-tiny-cpu"


def resolve_config(config: str) -> Path:
    """Resolve a release name (``deepseek-r1-iluvatar``, or a matrix pair's) or a path to a config file.

    A pair of a matrix resolves to ``<matrix file>#<chip>``, which
    :func:`flagrelease.config.load_release` loads.

    Raises:
        ConfigError: nothing matches; the message lists the known releases.
    """
    from flagrelease.matrix import PAIR_SEPARATOR, load_matrix, matrix_files, split_pair_reference

    pair = split_pair_reference(config)
    candidates = [Path(config), REPO_ROOT / config, release_configs_dir() / f"{config}.yaml"]
    if pair is not None:
        candidates = [pair[0], REPO_ROOT / pair[0]]
    for path in candidates:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return Path(f"{path.resolve()}{PAIR_SEPARATOR}{pair[1]}") if pair else path.resolve()
    pairs = {}
    for file in matrix_files(release_configs_dir()):
        with contextlib.suppress(ConfigError):
            pairs.update({p.name: Path(p.reference) for p in load_matrix(file).pairs})
    if config in pairs:
        return pairs[config]
    known = sorted({p.stem for p in release_configs_dir().glob("*.yaml")} | set(pairs))
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
    # One run of a release at a time: a second one refuses at once, naming this one.
    root = BundleLayout.for_release(cfg).root
    with contextlib.nullcontext() if dry_run else release_lock(root, release=cfg.name):
        remote = "eval" in wanted and cfg is release and release.remote_reference and not dry_run
        try:
            results = _run_stages(
                str(path), cfg, wanted, remote_reference=remote, dry_run=dry_run, force=force, options=options
            )
        finally:
            flush_artifacts()  # the stages' artifacts, created in the background
    create_markdown_artifact(
        _summary_markdown(cfg.name, results),
        key=f"release-{cfg.name}".replace(".", "-").replace("_", "-"),
        description=f"{cfg.name}: release summary",
    )
    return results


def _run_stages(
    config: str,
    cfg: ReleaseConfig,
    wanted: list[str],
    *,
    remote_reference: bool,
    dry_run: bool,
    force: bool,
    options: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Run the stages in order, starting a later stage beside the current one once its inputs are done.

    The image needs no stage (:func:`~flagrelease.pipeline.stage_inputs`), so it starts
    at once, beside the fetch and the convert, and only the card and a deploy that runs
    the image wait for it; a live reference on another chip is started first, on its own
    pool, and the eval waits for it.  Stages run in this thread (where their timeouts
    hold) unless started early, in a worker thread; a stage started early is waited for
    by the first stage that needs it, or at the end.

    A stage reads its inputs' results from their saved state, so they are not passed as
    task parameters (Prefect walks every parameter of every task run); the inputs'
    states are its ``wait_for``, which draws the graph in the UI.  A dry run saves
    nothing, so there they are passed.
    """
    states: dict[str, State[Any]] = {}

    def settle(name: str, future: PrefectFuture[Any]) -> None:
        """Wait for a submitted task and keep its state; raise its failure."""
        future.wait()
        states[name] = future.state
        states[name].result()

    def args(stage: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        inputs = stage_inputs(cfg, stage)
        for s in inputs:  # a stage started early is waited for when needed; its failure raises here
            if s in early and s not in states:
                settle(s, early[s])
        upstream = {s: states[s].result() for s in inputs if s in states} if dry_run else {}
        wait = [states[s] for s in inputs if s in states]
        return (config, upstream), {"dry_run": dry_run, "force": force, "options": options, "wait_for": wait}

    early: dict[str, PrefectFuture[dict[str, Any]]] = {}
    ref = reference.submit(config, force=force) if remote_reference else None
    for i, stage in enumerate(wanted):
        if stage in early:
            continue
        for later in wanted[i + 1 :]:
            inputs = [s for s in stage_inputs(cfg, later) if s in wanted]
            if later not in early and all(s in states for s in inputs):
                a, kw = args(later)
                early[later] = STAGE_TASKS[later].submit(*a, **kw)
        if stage == "eval" and ref is not None:
            settle("reference", ref)
        a, kw = args(stage)
        states[stage] = STAGE_TASKS[stage](*a, **kw, return_state=True)
        states[stage].result()  # raises when the stage failed, as a plain call does
    for stage in wanted:
        if stage not in states:
            settle(stage, early[stage])
    order = [n for s in wanted for n in (("reference", s) if s == "eval" and "reference" in states else (s,))]
    return {s: states[s].result() for s in order}


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
