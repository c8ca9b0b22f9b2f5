"""Prefect task: serve the model, check health, load-test, tear down (flagrelease.deploy)."""

from tasks._common import stage_task

__all__ = ["deploy"]

#: A server that failed to start is torn down first, so a retry starts clean.
deploy = stage_task("deploy", retries=1, retry_delay_seconds=30, timeout_seconds=4 * 3600)
