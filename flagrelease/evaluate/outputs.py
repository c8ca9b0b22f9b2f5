"""What the eval stage hands downstream."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["EvalOutputs", "ThroughputOutputs", "ThroughputTrial", "VariantOutputs"]


class VariantOutputs(StageOutputs):
    """One evaluated variant (``target``, ``reference``, ``target_gems_off``, ...).

    Attributes:
        dir: the lm-eval output folder (``samples_*.jsonl``), None when it failed or
            when the reference is published scores.
        scores: task -> score.
        tasks: task -> metric, score, n_items, samples_per_item.
        chip: the chip it ran on.
        weights: ``converted`` or ``source``.
        flaggems: whether FlagGems was on.
        excluded_ops: operators left off.
        throughput: output tokens/s (the mean of its throughput trials when it had any,
            else one level at the eval concurrency after its eval).
        gems_ops: the operators that ran.
        per_sample: the per-sample JSONL the gate reads.
        stored: the stored run it was read from, if any.
        scores_file: the published scores it was read from (``mode: scores``), if any.
        same_as: the variant whose run this one shares.
        probes: the pre-eval probes' findings (``stability``, ``truncation``).
        truncated: generated answers of the eval and how many stopped at ``max_tokens``.
        handed_over_to: where the reference side handed its run over, if it did.
        error: why it failed, when it did.
        error_kind: ``nonfinite``, ``truncated`` or ``unstable`` when it failed.
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
    scores_file: str | None = None
    same_as: str | None = None
    probes: dict[str, Any] | None = None
    truncated: dict[str, int] | None = None
    handed_over_to: str | None = None
    error: str | None = None
    error_kind: str | None = None


class ThroughputTrial(StageOutputs):
    """One throughput trial: one arm under a fixed load.

    Attributes:
        round: the round (each round measures both arms once).
        position: 0 or 1, the arm's place in its round (the order alternates).
        arm: the variant measured.
        tok_s: output tokens per second.
        requests, ok: requests sent, and answered.
        output_tokens: tokens generated.
        duration_s: the trial's wall time.
        at_s: when it started, seconds after the first.
        cpu_s: CPU seconds the server's process tree spent on it (local runtime), else None.
    """

    round: int
    position: int
    arm: str
    tok_s: float
    requests: int
    ok: int
    output_tokens: int
    duration_s: float
    at_s: float
    cpu_s: float | None = None

    def rate(self, metric: str) -> float | None:
        """Output tokens per second of wall time (``wall``) or of the server's CPU time (``cpu``)."""
        if metric == "wall":
            return self.tok_s
        return self.output_tokens / self.cpu_s if self.cpu_s and self.output_tokens else None


class ThroughputOutputs(StageOutputs):
    """The FlagGems on/off throughput trials (:func:`flagrelease.evaluate.measure_interleaved`).

    Attributes:
        arms: ``{"a": <FlagGems-on variant>, "b": <FlagGems-off variant>}``.
        servers: ``both`` (served at once) or ``alternate`` (re-served per trial).
        settings: trials, requests, concurrency, max_tokens, warmup_requests, timeout_s.
        trials: every trial, in the order run.
        seconds: the measurement's wall time, serving included.
    """

    arms: dict[str, str]
    servers: str
    settings: dict[str, Any] = {}
    trials: list[ThroughputTrial] = []
    seconds: float = 0.0


class EvalOutputs(StageOutputs):
    """Every variant evaluated, by name; ``plan`` lists them in a dry run; the throughput trials."""

    variants: dict[str, VariantOutputs] = {}
    plan: list[str] = []
    throughput: ThroughputOutputs | None = None
