"""One Prefect deployment per release config, named after the file.

A release whose reference runs live on another chip also gets ``<name>-reference`` in
that chip's pool: the same flow with the ``reference`` role, which the release's run
starts before its eval (:mod:`flagrelease.evaluate.reference`).

``flagrelease deploy`` registers them with the Prefect API (each in its chip's work
pool, so a worker on that chip picks it up); ``flagrelease serve`` serves them all from
this process, the embedded default.  Either way
``prefect deployment run flagrelease/<config-name>`` starts a release.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease.chips import load_chip
from flagrelease.config import load_release
from flagrelease.constants import REPO_ROOT, release_configs_dir
from flagrelease.errors import ConfigError
from flagrelease.roles import REFERENCE_ROLE, reference_deployment_name, reference_stages

__all__ = ["DeploymentSpec", "deployment_specs", "register_deployments", "serve_deployments"]

log = logging.getLogger("flagrelease.deployments")
ENTRYPOINT = "flows/release.py:flagrelease"


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
    specs = []
    errors = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            cfg = load_release(path)
        except ConfigError as err:
            errors.append(str(err))
            continue
        chip = cfg.chip_profile
        try:
            config = str(path if absolute else path.relative_to(REPO_ROOT))
        except ValueError:
            config = str(path)
        specs.append(
            DeploymentSpec(
                name=path.stem,
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
    if errors:
        raise ConfigError("invalid release configs:\n" + "\n".join(errors))
    return specs


async def _ensure_pools(pools: set[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        for pool in sorted(pools):
            try:
                await client.create_work_pool(
                    WorkPoolCreate(name=pool, type="process", description=f"workers on {pool} hardware")
                )
                log.info("created work pool %s", pool)
            except ObjectAlreadyExists:
                pass


def register_deployments(*, config_dir: Path | None = None) -> list[str]:
    """Register one deployment per release config with the Prefect API.

    Work pools (type ``process``) are created for chips that have none yet. Returns the
    deployment names.
    """
    from flows.release import flagrelease

    specs = deployment_specs(config_dir)
    asyncio.run(_ensure_pools({s.work_pool for s in specs}))
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
        )
    return [s.name for s in specs]


async def _take_over(names: list[str]) -> None:
    """Delete worker deployments (``flagrelease deploy``) of these names, so serving recreates them.

    A served deployment that updates a worker one keeps the worker's work pool, and
    Prefect's runner then loads the flow from storage the deployment no longer has: the
    run crashes at start.  ``flagrelease deploy`` registers them for workers again.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        for name in names:
            try:
                existing = await client.read_deployment_by_name(f"flagrelease/{name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name or existing.pull_steps:
                log.warning(
                    "serving flagrelease/%s from this process in place of its %s work-pool deployment",
                    name,
                    existing.work_pool_name,
                )
                await client.delete_deployment(existing.id)


def serve_deployments(*, config_dir: Path | None = None, limit: int | None = None) -> None:
    """Serve every release config's deployment from this process until interrupted."""
    from prefect import serve

    from flows.release import flagrelease

    specs = deployment_specs(config_dir, absolute=True)
    asyncio.run(_take_over([s.name for s in specs]))
    deployments = [
        flagrelease.to_deployment(
            name=spec.name,
            parameters=spec.parameters,
            tags=spec.tags,
            cron=spec.cron,
            description=spec.description,
        )
        for spec in specs
    ]
    serve(*deployments, limit=limit)
