"""Prefect task: idempotent uploads to the HF Hub, ModelScope, S3 and the registry (flagrelease.publish)."""

from __future__ import annotations

import logging

from flagrelease.pipeline import ReleaseContext
from tasks._common import stage_task

__all__ = ["publish"]

log = logging.getLogger("flagrelease.publish")


def _secret(name: str) -> str | None:
    """The value of the Prefect Secret block ``name``, or None when there is no such block."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:  # no block of that name
        return None
    return str(value) if value else None


def _resolve_credentials(ctx: ReleaseContext) -> None:
    """Put tokens from Prefect Secret blocks into the stage's options (environment wins when unset)."""
    # Imported here: the publish package is heavy, and a flow run that reuses the stage never needs it.
    from flagrelease.publish import credentials_from_secrets

    ctx.options["publish_credentials"] = credentials_from_secrets(_secret)


#: Uploads are idempotent and resumable, so retries only send what is missing; a release
#: refused by its gate is not retried.
publish = stage_task(
    "publish", retries=3, retry_delay_seconds=60, timeout_seconds=24 * 3600, prepare=_resolve_credentials
)
