"""The publish stage: idempotent, resumable uploads of the bundle to a local folder, the HF Hub, ModelScope, S3 and a registry."""

from __future__ import annotations

from flagrelease.publish._publish import (
    SECRET_BLOCKS,
    DestinationPlan,
    DestinationResult,
    PlannedFile,
    PublishCredentials,
    PublishPlan,
    PublishResult,
    credentials_from_secrets,
    publish_bundle,
    run_stage,
)

__all__ = [
    "SECRET_BLOCKS",
    "DestinationPlan",
    "DestinationResult",
    "PlannedFile",
    "PublishCredentials",
    "PublishPlan",
    "PublishResult",
    "credentials_from_secrets",
    "publish_bundle",
    "run_stage",
]
