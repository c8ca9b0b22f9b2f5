"""The ``flagrelease-matrix`` flow: one model across every chip of its matrix.

One run starts each pair's ``flagrelease/<pair>`` deployment (on its chip's work pool) at
once, waits for all of them, and then gathers their bundle manifests into the support
table and the collection card (:mod:`flagrelease.matrix`), published beside the bundles.
A pair that fails does not stop the others; it shows as failed in the table, and the
matrix run ends Failed once everything else is done.  Re-running the matrix re-runs every
pair's deployment, and each pair's stage cache makes a finished, current pair a quick no-op.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flagrelease._redact import redact
from flagrelease.constants import REPO_ROOT, release_configs_dir
from flagrelease.errors import ConfigError
from flagrelease.matrix import (
    Matrix,
    PairOutcome,
    build_collection,
    load_matrix,
    publish_collection,
    support_table,
    table_rows,
)
from flagrelease.publish import credentials_from_secrets

__all__ = ["flagrelease_matrix", "resolve_matrix", "run_pair"]

#: States of a pair's run that count as finished without error.
_DONE = ("COMPLETED",)


def resolve_matrix(matrix: str) -> Path:
    """Resolve a matrix name (``deepseek-r1``) or a path to a matrix file.

    Raises:
        ConfigError: nothing matches; the message lists the known matrices.
    """
    folder = release_configs_dir() / "matrices"
    for path in (Path(matrix), REPO_ROOT / matrix, folder / f"{matrix}.yaml"):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return path.resolve()
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"no matrix {matrix!r}; known matrices: {', '.join(known) or 'none'} (in {folder})")


def _key(*parts: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


@task(name="pair", task_run_name="{chip}", retries=0)
def run_pair(deployment: str, *, chip: str, matrix: str, force: bool = False) -> dict[str, Any]:
    """Run ``flagrelease/<deployment>`` on its work pool and wait; report how it ended, never raise.

    Args:
        deployment: the pair's deployment name (its release name).
        chip: the pair's chip.
        matrix: the matrix name (a tag on the run).
        force: ignore the pair's cached stage results.

    Returns:
        A :class:`~flagrelease.matrix.PairOutcome` as a dict.
    """
    logger = get_run_logger()
    name = f"flagrelease/{deployment}"
    logger.info("starting %s on the %s work pool", name, chip)
    try:
        run = run_deployment(
            name,
            parameters={"force": True} if force else None,
            timeout=None,
            poll_interval=3,
            tags=[f"matrix:{matrix}", f"chip:{chip}"],
        )
    except ObjectNotFound:
        message = f"no deployment {name}: register it with `flagrelease deploy`"
        logger.error("%s", message)
        return asdict(PairOutcome(chip=chip, state="NOT_STARTED", message=message))
    state = run.state
    kind = state.type.value if state is not None else "UNKNOWN"
    message = "" if kind in _DONE else redact(str(state.message or "")) if state is not None else "no final state"
    (logger.info if kind in _DONE else logger.error)("%s (%s) ended %s %s", name, run.name, kind, message)
    return asdict(PairOutcome(chip=chip, state=kind, flow_run=str(run.id), run_name=run.name, message=message))


def _secret(name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:  # no block of that name
        return None
    return str(value) if value else None


@task(name="collection", retries=2, retry_delay_seconds=30)
def collect(matrix_path: str, outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build the support table and the collection card from the pairs' manifests, and publish them."""
    matrix = load_matrix(Path(matrix_path))
    creds = credentials_from_secrets(_secret)
    table = support_table(matrix, {c: PairOutcome(**o) for c, o in outcomes.items()}, credentials=creds)
    collection = build_collection(matrix, table=table)
    publish_collection(matrix, collection, credentials=creds)
    create_table_artifact(
        table_rows(table), key=_key("matrix", matrix.name, "support"), description=f"{matrix.name}: support table"
    )
    create_markdown_artifact(
        _summary(matrix, table, collection.summary()),
        key=_key("matrix", matrix.name),
        description=f"{matrix.name}: where {matrix.model_name} stands on every chip",
    )
    return {
        "support": str(collection.support),
        "card": str(collection.card),
        "published": collection.summary(),
        "counts": table["counts"],
        "rows": [{k: r[k] for k in ("chip", "pair", "status", "verdict", "bundle_url")} for r in table["rows"]],
    }


def _summary(matrix: Matrix, table: dict[str, Any], published: str) -> str:
    lines = [f"# {matrix.title}", "", "| chip | release | run | status | verdict |", "| --- | --- | --- | --- | --- |"]
    for r in table["rows"]:
        lines.append(f"| {r['chip_name']} | {r['pair']} | {r['run']['state']} | {r['status']} | {r['verdict'] or ''} |")
    lines += ["", f"Collection: {published}", ""]
    return "\n".join(lines)


@flow(
    name="flagrelease-matrix",
    description="Release one model on every chip of its matrix, then build its support table and collection card.",
    task_runner=ThreadPoolTaskRunner(max_workers=64),
    persist_result=True,
    log_prints=True,
)
def flagrelease_matrix(matrix: str, chips: list[str] | None = None, force: bool = False) -> State[Any]:
    """Run every pair of ``matrix`` on its chip's work pool, then build and publish the collection.

    Args:
        matrix: a matrix name in release_configs/matrices/, or a path to a matrix file.
        chips: run only these chips' pairs (the table still shows every chip).
        force: ignore the pairs' cached stage results.

    Returns:
        Completed when every pair run completed, else Failed (after the table and card
        are made); its data is the collection's summary.
    """
    logger = get_run_logger()
    path = resolve_matrix(matrix)
    m = load_matrix(path)
    unknown = sorted(set(chips or []) - {p.chip for p in m.pairs})
    if unknown:
        raise ConfigError(
            f"matrix {m.name} has no chip(s) {', '.join(unknown)}; its chips: {', '.join(p.chip for p in m.pairs)}"
        )
    pairs = [p for p in m.pairs if not chips or p.chip in chips]
    logger.info("matrix %s: %s on %s", m.name, m.model_name, ", ".join(p.chip for p in pairs))
    futures = {p.chip: run_pair.submit(p.deployment, chip=p.chip, matrix=m.name, force=force) for p in pairs}
    outcomes = {chip: f.result() for chip, f in futures.items()}
    result = collect(str(path), outcomes)
    failed = sorted(c for c, o in outcomes.items() if o["state"] not in _DONE)
    if failed:
        return Failed(
            message=f"{len(failed)} of {len(pairs)} pair(s) did not complete: {', '.join(failed)}; the support "
            f"table and collection card show them as failed",
            data=result,
        )
    return Completed(message=f"{len(pairs)} pair(s) completed", data=result)
