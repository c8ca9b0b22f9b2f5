"""What the gate stage hands downstream."""

from __future__ import annotations

from flagrelease.pipeline import StageOutputs

__all__ = ["GateOutputs"]


class GateOutputs(StageOutputs):
    """The verdicts.

    Attributes:
        results: the gate results JSON (``reports/gate_results.json``).
        verdict: ``consistent``, ``inconsistent``, ``inconclusive`` or ``missing``.
        throughput_ok: the FlagGems on/off throughput verdict, None when not measured.
        blamed_ops: FlagGems operators the bisection blamed.
        proposed_excluded_ops: what to put in ``serve.flaggems.excluded_ops``.
    """

    results: str | None = None
    verdict: str | None = None
    throughput_ok: bool | None = None
    blamed_ops: list[str] = []
    proposed_excluded_ops: list[str] = []
