"""Prefect task: render the model card and the bundle manifest (flagrelease.card)."""

from tasks._common import stage_task

__all__ = ["card"]

card = stage_task("card", retries=0, timeout_seconds=600)
