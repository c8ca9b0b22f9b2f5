"""Prefect task: download the weights at the pinned revision (flagrelease.fetch)."""

from tasks._common import stage_task

__all__ = ["fetch"]

#: Network hiccups are worth retrying; downloads resume where they stopped.
fetch = stage_task("fetch", retries=3, retry_delay_seconds=30, timeout_seconds=24 * 3600)
