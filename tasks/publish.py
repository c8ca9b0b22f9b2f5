"""Prefect task: idempotent uploads to the HF Hub, ModelScope, S3 and the registry (flagrelease.publish)."""

from tasks._common import stage_task

__all__ = ["publish"]

#: Uploads are idempotent and resumable, so retries only send what is missing.
publish = stage_task("publish", retries=3, retry_delay_seconds=60, timeout_seconds=24 * 3600)
