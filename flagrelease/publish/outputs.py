"""What the publish stage reports."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["PublishOutputs"]


class PublishOutputs(StageOutputs):
    """Where the bundle went.

    Attributes:
        destinations: name -> url, uploaded, skipped, bytes, details, verified (files
            downloaded back and checked before promotion), promoted (made public) and warnings.
        gate_failed: published although the release failed its gate (the config allowed it).
        gate_unverified: ``inconclusive`` or ``missing``: published although the gate did not
            show the release consistent (``publish.allow_verdicts``); None otherwise.
        warnings: what a person must know or still do.
        blocked: why a dry run would refuse to publish, if it would.
    """

    destinations: dict[str, dict[str, Any]] = {}
    gate_failed: bool = False
    gate_unverified: str | None = None
    warnings: list[str] = []
    blocked: list[str] | str | None = None
