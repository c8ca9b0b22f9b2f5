"""What the card stage hands downstream."""

from __future__ import annotations

from flagrelease.pipeline import StageOutputs

__all__ = ["CardOutputs"]


class CardOutputs(StageOutputs):
    """The card and the manifest.

    Attributes:
        card: the model card (``bundle/README.md``).
        manifest: the bundle manifest (``bundle/flagrelease.json``).
        missing: benchmarks with no result.
        gate_failed: whether the release failed its gates.
    """

    card: str
    manifest: str
    missing: list[str] = []
    gate_failed: bool = False
