"""One Prefect deployment per release config, named after the file.

A release whose reference runs live on another chip also gets ``<name>-reference`` in
that chip's pool: the same flow with the ``reference`` role, which the release's run
starts before its eval (:mod:`flagrelease.evaluate.reference`).

Each pair of a matrix (``release_configs/matrices/<matrix>.yaml``) is a release as well,
``flagrelease/<pair>`` in its chip's pool, and each matrix gets ``flagrelease-matrix/<matrix>``
(the ``flagrelease-matrix`` flow, in the matrix's own pool), which runs all its pairs.

``flagrelease deploy`` registers them with the Prefect API (each in its chip's work
pool, so a worker on that chip picks it up; a chip's pool runs one release per node);
``flagrelease serve`` serves them all from this process, the embedded default.  Either way
``prefect deployment run flagrelease/<config-name>`` starts a release and
``prefect deployment run flagrelease-matrix/<matrix>`` a whole matrix.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease.chips import load_chip
from flagrelease.config import ReleaseConfig, load_release
from flagrelease.constants import REPO_ROOT, release_configs_dir
from flagrelease.errors import ConfigError
from flagrelease.limits import pool_concurrency
from flagrelease.matrix import PAIR_SEPARATOR, Matrix, load_matrix, matrix_files, split_pair_reference
from flagrelease.roles import REFERENCE_ROLE, reference_deployment_name, reference_stages

__all__ = [
    "DeploymentSpec",
    "MatrixDeploymentSpec",
    "deployment_specs",
    "matrix_deployment_specs",
    "register_deployments",
    "serve_deployments",
]

log = logging.getLogger("flagrelease.deployments")
ENTRYPOINT = "flows/release.py:flagrelease"
MATRIX_ENTRYPOINT = "flows/matrix.py:flagrelease_matrix"


@dataclass(frozen=True)
class DeploymentSpec:
    """What a deployment of one release config carries."""

    name: str
    config: str
    work_pool: str
    tags: list[str] = field(default_factory=list)
    cron: str | None = None
    description: str = ""
    stages: list[str] | None = None
    options: dict[str, Any] | None = None

    @property
    def parameters(self) -> dict[str, Any]:
        """The flow parameters of the deployment."""
        extra = {k: v for k, v in (("stages", self.stages), ("options", self.options)) if v}
        return {"config": self.config, **extra}


def deployment_specs(config_dir: Path | None = None, *, absolute: bool = False) -> list[DeploymentSpec]:
    """A spec for each ``*.yaml`` in ``config_dir`` (default: release_configs/).

    Args:
        config_dir: folder of release configs.
        absolute: pass the config as an absolute path (serving from this process) rather
            than relative to the repo root (workers check the repo out themselves).

    Raises:
        ConfigError: a config is invalid (all configs must validate before any is deployed).
    """
    folder = (config_dir or release_configs_dir()).resolve()
    specs: list[DeploymentSpec] = []
    errors: list[str] = []
    releases: list[tuple[str, str, ReleaseConfig]] = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            releases.append((path.stem, _config_param(path, absolute=absolute), load_release(path)))
        except ConfigError as err:
            errors.append(str(err))
    # Each pair of a matrix is a release too; a pair that names a config file of its own
    # (chips: {<chip>: {config: ...}}) is that file's deployment, listed above.
    own = {str(p.resolve()) for p in folder.glob("*.yaml")}
    for matrix in _matrices(folder, errors):
        for pair in matrix.pairs:
            if split_pair_reference(pair.reference) is None and str(Path(pair.reference).resolve()) in own:
                continue
            releases.append((pair.deployment, _config_param(pair.reference, absolute=absolute), pair.config))
    for name, config, cfg in releases:
        chip = cfg.chip_profile
        specs.append(
            DeploymentSpec(
                name=name,
                config=config,
                work_pool=chip.work_pool,
                tags=sorted(
                    {"flagrelease", f"chip:{chip.name}", f"vendor:{chip.vendor}", f"pool:{chip.work_pool}", *cfg.tags}
                ),
                cron=cfg.schedule,
                description=cfg.description or f"{cfg.model.repo_id} on {chip.display_name}",
            )
        )
        if cfg.remote_reference:
            ref = load_chip(cfg.eval.reference.chip)
            specs.append(
                DeploymentSpec(
                    name=reference_deployment_name(cfg),
                    config=config,
                    work_pool=ref.work_pool,
                    tags=sorted(
                        {"flagrelease", "role:reference", f"reference-of:{cfg.name}", f"chip:{ref.name}"}
                        | {f"vendor:{ref.vendor}", f"pool:{ref.work_pool}"}
                    ),
                    description=f"The {ref.display_name} reference of {cfg.name}, started by its release run",
                    stages=reference_stages(cfg),
                    options={"role": REFERENCE_ROLE},
                )
            )
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            errors.append(
                f"two releases are named {spec.name} ({seen[spec.name]} and {spec.config}): deployment names "
                "must be unique; rename one (a matrix pair takes its overrides' `name`)"
            )
        seen[spec.name] = spec.config
    if errors:
        raise ConfigError("invalid release configs:\n" + "\n".join(errors))
    return specs


def _config_param(path: Path | str, *, absolute: bool) -> str:
    """A config as a deployment parameter: relative to the repo root unless ``absolute`` or outside it."""
    split = split_pair_reference(path)
    file, suffix = (split[0], f"{PAIR_SEPARATOR}{split[1]}") if split else (Path(path), "")
    file = file.resolve()
    try:
        return str(file if absolute else file.relative_to(REPO_ROOT)) + suffix
    except ValueError:
        return str(file) + suffix


def _matrices(folder: Path, errors: list[str]) -> list[Matrix]:
    out = []
    for path in matrix_files(folder):
        try:
            out.append(load_matrix(path))
        except ConfigError as err:
            errors.append(str(err))
    return out


@dataclass(frozen=True)
class MatrixDeploymentSpec:
    """What the deployment of one matrix (the ``flagrelease-matrix`` flow) carries."""

    name: str
    matrix: str
    work_pool: str
    tags: list[str] = field(default_factory=list)
    cron: str | None = None
    description: str = ""

    @property
    def parameters(self) -> dict[str, Any]:
        """The flow parameters of the deployment."""
        return {"matrix": self.matrix}


def matrix_deployment_specs(config_dir: Path | None = None, *, absolute: bool = False) -> list[MatrixDeploymentSpec]:
    """A spec for each matrix file in ``<config_dir>/matrices/`` (default: release_configs/matrices/).

    Raises:
        ConfigError: a matrix is invalid.
    """
    folder = (config_dir or release_configs_dir()).resolve()
    errors: list[str] = []
    specs = [
        MatrixDeploymentSpec(
            name=m.name,
            matrix=_config_param(m.path, absolute=absolute),
            work_pool=m.config.work_pool,
            tags=sorted({"flagrelease", "matrix", f"matrix:{m.name}", *m.config.tags}),
            cron=m.config.schedule,
            description=m.config.description or f"{m.model_name} on {', '.join(p.chip for p in m.pairs)}",
        )
        for m in _matrices(folder, errors)
    ]
    if errors:
        raise ConfigError("invalid matrices:\n" + "\n".join(errors))
    return specs


def _pool_limits(specs: list[DeploymentSpec], matrices: list[MatrixDeploymentSpec]) -> dict[str, int | None]:
    """Each work pool and its concurrency limit: a chip's pool runs one release per node (the profile's ``nodes``)."""
    limits: dict[str, int | None] = {m.work_pool: None for m in matrices}
    for spec in specs:
        chip = next(t.split(":", 1)[1] for t in spec.tags if t.startswith("chip:"))
        limits[spec.work_pool] = pool_concurrency(load_chip(chip))
    return limits


async def _ensure_pools(pools: dict[str, int | None]) -> None:
    """Create missing work pools (type ``process``) and set each chip pool's concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        for pool, limit in sorted(pools.items()):
            try:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=pool, type="process", description=f"workers on {pool} hardware", concurrency_limit=limit
                    )
                )
                log.info("created work pool %s (concurrency limit %s)", pool, limit)
            except ObjectAlreadyExists:
                if limit is not None:
                    existing = await client.read_work_pool(pool)
                    if existing.concurrency_limit != limit:
                        await client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=limit))
                        log.info("work pool %s: concurrency limit %s (its chip's nodes)", pool, limit)


def register_deployments(*, config_dir: Path | None = None) -> list[str]:
    """Register one deployment per release config, matrix pair and matrix with the Prefect API.

    Work pools (type ``process``) are created for chips that have none yet, and each
    chip's pool gets its concurrency limit (:func:`flagrelease.limits.pool_concurrency`).

    Returns:
        The deployments' full names (``flagrelease/<release>``, ``flagrelease-matrix/<matrix>``).
    """
    from flows.matrix import flagrelease_matrix
    from flows.release import flagrelease

    specs = deployment_specs(config_dir)
    matrices = matrix_deployment_specs(config_dir)
    asyncio.run(_ensure_pools(_pool_limits(specs, matrices)))
    source = flagrelease.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    for spec in specs:
        source.deploy(
            name=spec.name,
            work_pool_name=spec.work_pool,
            parameters=spec.parameters,
            tags=spec.tags,
            cron=spec.cron,
            description=spec.description,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,  # Prefect's process-pool notice, once per deployment; ours follows, once
        )
    matrix_source = flagrelease_matrix.from_source(source=str(REPO_ROOT), entrypoint=MATRIX_ENTRYPOINT)
    for m in matrices:
        matrix_source.deploy(
            name=m.name,
            work_pool_name=m.work_pool,
            parameters=m.parameters,
            tags=m.tags,
            cron=m.cron,
            description=m.description,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
        )
    pools = sorted({s.work_pool for s in specs} | {m.work_pool for m in matrices})
    log.info(
        "registered %d deployments in the process work pools %s: start a worker on a machine with each "
        "chip (prefect worker start --pool POOL), or serve them all from this process (flagrelease serve)",
        len(specs) + len(matrices),
        ", ".join(pools),
    )
    return [f"flagrelease/{s.name}" for s in specs] + [f"flagrelease-matrix/{m.name}" for m in matrices]


@dataclass
class TakenOver:
    """A work-pool deployment ``flagrelease serve`` replaced, kept to be given back when it stops."""

    full_name: str
    work_pool: str
    deployment: Any  # prefect.client.schemas.responses.DeploymentResponse


def _local_pools() -> set[str]:
    """The work pools of this machine's chips: those of the CPU chip profiles."""
    from flagrelease.chips import list_chips

    return {chip.work_pool for chip in map(load_chip, list_chips()) if chip.accelerator.value == "cpu"}


async def _take_over(candidates: list[tuple[str, bool]], *, take_over: bool) -> tuple[set[str], list[TakenOver]]:
    """Decide which deployments this process serves; move the work-pool ones it replaces aside.

    A served deployment that updated a worker one would keep the worker's work pool, and
    Prefect's runner would then load the flow from storage the deployment no longer has:
    the run crashes at start.  So a work-pool deployment of the same name is deleted here
    and recorded, to be re-created as it was by :func:`_give_back` when serving stops.
    Work-pool deployments of another chip (a pool that is not this machine's) are left
    alone, and not served here, unless ``take_over``.

    Args:
        candidates: ``(flow/deployment name, whether it may always be taken over)``.
        take_over: take over other chips' work-pool deployments too.

    Returns:
        The full names to serve, and the deployments taken over.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    local = _local_pools()
    serve: set[str] = set()
    taken: list[TakenOver] = []
    async with get_client() as client:
        for full_name, always in candidates:
            try:
                existing = await client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                serve.add(full_name)
                continue
            pool = existing.work_pool_name
            if not pool and not existing.pull_steps:
                serve.add(full_name)  # a served deployment already: serving updates it
                continue
            if pool and pool not in local and not always and not take_over:
                log.warning(
                    "not serving %s: it belongs to the %s work pool (another chip's workers run it); "
                    "pass --take-over to serve it from this process until it stops",
                    full_name,
                    pool,
                )
                continue
            log.warning(
                "serving %s from this process in place of its %s work-pool deployment; it is given back when "
                "serving stops",
                full_name,
                pool,
            )
            taken.append(TakenOver(full_name=full_name, work_pool=pool or "", deployment=existing))
            await client.delete_deployment(existing.id)
            serve.add(full_name)
    return serve, taken


async def _give_back(taken: list[TakenOver]) -> list[str]:
    """Re-create each deployment taken over as it was: work pool, paused state, schedules, parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.exceptions import ObjectNotFound

    given: list[str] = []
    async with get_client() as client:
        for item in taken:
            d = item.deployment
            try:  # the deployment serving left behind (no pool, paused)
                served = await client.read_deployment_by_name(item.full_name)
                await client.delete_deployment(served.id)
            except ObjectNotFound:
                pass
            schedules = [
                DeploymentScheduleCreate(schedule=s.schedule, active=s.active, parameters=s.parameters, slug=s.slug)
                for s in d.schedules or []
            ]
            await client.create_deployment(
                flow_id=d.flow_id,
                name=d.name,
                version=d.version,
                schedules=schedules,
                concurrency_limit=d.concurrency_limit,
                parameters=d.parameters,
                description=d.description,
                work_queue_name=d.work_queue_name,
                work_pool_name=d.work_pool_name,
                tags=d.tags,
                path=d.path,
                entrypoint=d.entrypoint,
                parameter_openapi_schema=d.parameter_openapi_schema,
                paused=d.paused,
                pull_steps=d.pull_steps,
                enforce_parameter_schema=d.enforce_parameter_schema,
                job_variables=d.job_variables,
            )
            log.info("gave %s back to the %s work pool (paused: %s)", item.full_name, item.work_pool, d.paused)
            given.append(item.full_name)
    return given


def _serve_until_interrupted(deployments: list[Any], *, limit: int | None) -> None:
    """Serve ``deployments`` (Prefect's runner) until SIGINT or SIGTERM; stop it gracefully.

    ``prefect.serve`` turns Ctrl-C into a cancellation of the runner, wherever it is: one
    that lands while the runner is still starting (its API client, event worker and task
    groups half entered) can leave threads that keep the process alive after it.  Here a
    signal only asks the runner to stop, once it has started, through its own ``astop``.
    """
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True, limit=limit)
    for deployment in deployments:
        runner.add_deployment(deployment)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # the runner sets its own SIGTERM handler once started
            loop.add_signal_handler(sig, stop.set)
        running = asyncio.ensure_future(runner.start())
        asking = asyncio.ensure_future(stop.wait())
        await asyncio.wait({running, asking}, return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            log.info("stopping: the runner finishes its start, then stops")
            while not runner.started and not running.done():
                await asyncio.sleep(0.1)
            if not running.done():
                await runner.astop()
        asking.cancel()
        await running

    log.info(
        "serving %d deployment(s) from this process: %s; Ctrl-C stops",
        len(deployments),
        ", ".join(sorted(str(d.name) for d in deployments)),
    )
    asyncio.run(main())


def serve_deployments(
    *, config_dir: Path | None = None, limit: int | None = None, take_over: bool = False
) -> list[str]:
    """Serve every release config's (and matrix's) deployment from this process until interrupted.

    Work-pool deployments of this machine's chips (and of matrices) are taken over while
    serving and given back (work pool, paused state, schedules) when it stops, Ctrl-C
    included; those of other chips are left to their workers unless ``take_over``.

    Args:
        config_dir: folder of release configs (default: release_configs/).
        limit: at most this many runs at once.
        take_over: also serve (and then give back) other chips' work-pool deployments.

    Returns:
        The full names of the deployments given back.
    """
    from flows.matrix import flagrelease_matrix
    from flows.release import flagrelease

    specs = deployment_specs(config_dir, absolute=True)
    matrices = matrix_deployment_specs(config_dir, absolute=True)
    candidates = [(f"flagrelease/{s.name}", False) for s in specs]
    candidates += [(f"flagrelease-matrix/{m.name}", True) for m in matrices]
    chosen, taken = asyncio.run(_take_over(candidates, take_over=take_over))
    try:
        deployments = [
            flagrelease.to_deployment(
                name=s.name, parameters=s.parameters, tags=s.tags, cron=s.cron, description=s.description
            )
            for s in specs
            if f"flagrelease/{s.name}" in chosen
        ]
        deployments += [
            flagrelease_matrix.to_deployment(
                name=m.name, parameters=m.parameters, tags=m.tags, cron=m.cron, description=m.description
            )
            for m in matrices
            if f"flagrelease-matrix/{m.name}" in chosen
        ]
        if deployments:
            _serve_until_interrupted(deployments, limit=limit)
        else:
            log.warning("no deployment to serve from this process")
    finally:
        given = asyncio.run(_give_back(taken)) if taken else []
    return given
