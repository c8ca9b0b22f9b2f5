"""Prefect task: lm-eval on the target and the reference (flagrelease.evaluate)."""

from tasks._common import stage_task

__all__ = ["evaluate"]

#: Per-request results are cached, so a retry after a server death resumes the eval.
evaluate = stage_task("eval", retries=1, retry_delay_seconds=60, timeout_seconds=48 * 3600)
