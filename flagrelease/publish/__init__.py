"""The publish stage: private first, verified, then public; to a folder, the HF Hub, ModelScope, S3, a registry."""

from __future__ import annotations

from flagrelease.publish._credentials import SECRET_BLOCKS, PublishCredentials, credentials_from_secrets
from flagrelease.publish._plan import DestinationPlan, PublishPlan, PublishResult
from flagrelease.publish._publish import publish_bundle
from flagrelease.publish._stage import run_stage
from flagrelease.publish._types import Destination, DestinationResult, PlannedFile

__all__ = [
    "SECRET_BLOCKS",
    "Destination",
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
