"""What the publish stage reports."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["PublishOutputs"]


class PublishOutputs(StageOutputs):
    """Where the bundle went.

    Attributes:
        destinations: name -> url, uploaded, skipped, bytes and details.
        gate_failed: published although the release failed its gate (the config allowed it).
        blocked: why a dry run would refuse to publish, if it would.
    """

    destinations: dict[str, dict[str, Any]] = {}
    gate_failed: bool = False
    blocked: list[str] | str | None = None
