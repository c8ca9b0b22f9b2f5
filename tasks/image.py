"""Prefect task: render, build and push the vendor image (flagrelease.image)."""

from tasks._common import stage_task

__all__ = ["image"]

#: Registry pushes fail transiently; builds are layer-cached, so retries are cheap.
image = stage_task("image", retries=2, retry_delay_seconds=30, timeout_seconds=4 * 3600)
