"""What the eval stage hands downstream."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["EvalOutputs", "VariantOutputs"]


class VariantOutputs(StageOutputs):
    """One evaluated variant (``target``, ``reference``, ``target_gems_off``, ...).

    Attributes:
        dir: the lm-eval output folder (``samples_*.jsonl``), None when it failed.
        scores: task -> score.
        tasks: task -> metric, score, n_items, samples_per_item.
        chip: the chip it ran on.
        weights: ``converted`` or ``source``.
        flaggems: whether FlagGems was on.
        excluded_ops: operators left off.
        throughput: output tokens/s while evaluating.
        gems_ops: the operators that ran.
        per_sample: the per-sample JSONL the gate reads.
        stored: the stored run it was read from, if any.
        same_as: the variant whose run this one shares.
        error: why it failed, when it did.
    """

    dir: str | None = None
    scores: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    chip: str = ""
    weights: str = ""
    flaggems: bool = False
    excluded_ops: list[str] = []
    throughput: float | None = None
    gems_ops: list[str] = []
    per_sample: str | None = None
    stored: str | None = None
    same_as: str | None = None
    error: str | None = None


class EvalOutputs(StageOutputs):
    """Every variant evaluated, by name; ``plan`` lists them in a dry run."""

    variants: dict[str, VariantOutputs] = {}
    plan: list[str] = []
