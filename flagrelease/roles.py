"""Roles a run can take: the release itself, or the reference side of a live reference on another chip.

The hand-over of a finished reference run lives with the eval stage
(:mod:`flagrelease.evaluate.reference`); this module is what the pipeline, the CLI and the
flows need to pick a run's config and stages.
"""

from __future__ import annotations

from flagrelease.config import ReleaseConfig
from flagrelease.errors import ConfigError

__all__ = [
    "REFERENCE_ROLE",
    "ROLES",
    "reference_deployment_name",
    "reference_stages",
    "release_for_role",
]

#: The stage option (``ctx.options["role"]``) that marks the reference side.
REFERENCE_ROLE = "reference"
#: Every role a run may take (``None``: the release itself).
ROLES = (REFERENCE_ROLE,)


def release_for_role(cfg: ReleaseConfig, role: str | None) -> ReleaseConfig:
    """The config a run with ``role`` works on: ``cfg`` itself, or its reference side.

    Raises:
        ConfigError: the role is unknown, or the release has no reference on another chip.
    """
    if role is None:
        return cfg
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; roles: {', '.join(ROLES)}", model=cfg.name)
    if not cfg.remote_reference:
        raise ConfigError(
            f"{cfg.name}: role 'reference' is for a live reference on another chip, but eval.reference is "
            f"{cfg.eval.reference.mode} on {cfg.eval.reference.chip}; this release evaluates its reference itself",
            model=cfg.name,
            chip=cfg.chip,
        )
    return cfg.reference_side()


def reference_deployment_name(cfg: ReleaseConfig) -> str:
    """The Prefect deployment (of the ``flagrelease`` flow) that runs the reference side."""
    return f"{cfg.name}-reference"


def reference_stages(cfg: ReleaseConfig) -> list[str]:
    """The stages the reference side runs, in order."""
    convert = ["convert"] if cfg.eval.reference.weights == "converted" else []
    return ["fetch", *convert, "image", "eval"]
