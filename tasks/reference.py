"""Prefect task: run a release's live reference on the reference chip's work pool (flagrelease.evaluate.reference).

The reference side is the same ``flagrelease`` flow, deployed as ``<release>-reference``
in the reference chip's pool by ``flagrelease deploy``; this task starts it, waits for
it, and checks that it handed a current run over.  A run already there with the current
key is reused without starting anything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flagrelease.config import load_release
from flagrelease.errors import EvalError
from flagrelease.pipeline import StageResult
from flagrelease.roles import reference_deployment_name
from tasks._common import _artifact_key

__all__ = ["reference"]


@task(name="reference", retries=1, retry_delay_seconds=60, timeout_seconds=7 * 24 * 3600)
def reference(config: str, force: bool = False) -> dict[str, Any]:
    """Make sure ``eval.reference.results_dir`` holds a current reference run of ``config``.

    Args:
        config: the release config file.
        force: run the reference again even if a current run is there.

    Raises:
        EvalError: the reference deployment is missing, its run did not complete, or it
            completed without handing a current run over.
    """
    from flagrelease.evaluate.reference import reference_ready  # the eval package is heavy: only when needed

    logger = get_run_logger()
    cfg = load_release(Path(config))
    ref = cfg.eval.reference
    name = f"flagrelease/{reference_deployment_name(cfg)}"
    started = time.time()
    if reference_ready(cfg) and not force:
        summary = f"The {ref.chip} reference in `{ref.results_dir}` is current; nothing started."
        run_id = None
    else:
        logger.info("starting %s on the %s work pool; waiting for it", name, ref.chip)
        try:
            # Forced: it only runs when no current hand-over exists, and a cached eval
            # on the reference side would not hand over again (the folder was lost, say).
            run = run_deployment(
                name, parameters={"force": True}, timeout=None, poll_interval=5, tags=[f"reference-of:{cfg.name}"]
            )
        except ObjectNotFound as err:
            raise EvalError(
                f"no deployment {name}: register it with `flagrelease deploy` (it goes to the {ref.chip} work pool)",
                model=cfg.name,
                chip=cfg.chip,
                stage="eval",
            ) from err
        state = run.state
        if state is None or not state.is_completed():
            raise EvalError(
                f"the reference run {run.name} ({name}) ended {state.type.value if state else 'without a state'}: "
                f"{state.message if state else ''}; see it in the Prefect UI",
                model=cfg.name,
                chip=cfg.chip,
                stage="eval",
            )
        if not reference_ready(cfg):
            raise EvalError(
                f"the reference run {run.name} completed but {ref.results_dir} holds no current run: do both work "
                "pools see the same eval.reference.results_dir?",
                model=cfg.name,
                chip=cfg.chip,
                stage="eval",
            )
        summary = f"Ran {name} ({run.name}) on the {ref.chip} pool; its per-sample logs are in `{ref.results_dir}`."
        run_id = str(run.id)
    create_markdown_artifact(
        f"## reference\n\n{summary}\n",
        key=_artifact_key(cfg.name, "reference"),
        description=f"{cfg.name}: the live {ref.chip} reference",
    )
    result = StageResult(
        "reference",
        summary,
        outputs={"results_dir": str(ref.results_dir), "deployment": name, "flow_run": run_id, "chip": ref.chip},
        started_at=started,
        finished_at=time.time(),
    )
    return result.to_json()
