"""Prefect task: the paired statistical verdict and throughput gate (flagrelease.gate)."""

from tasks._common import stage_task

__all__ = ["gate"]

#: Pure computation (plus bisection re-serves): a retry would give the same verdict.
gate = stage_task("gate", retries=0, timeout_seconds=24 * 3600)
