"""Prefect task: stream the checkpoint through the conversion (flagrelease.convert)."""

from tasks._common import stage_task

__all__ = ["convert"]

#: A conversion resumes at the first unfinished shard, so one retry is cheap.
convert = stage_task("convert", retries=1, timeout_seconds=24 * 3600)
