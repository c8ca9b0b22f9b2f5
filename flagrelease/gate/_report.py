"""The gate's report: one row per benchmark, the overall verdict, the JSON and the text table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flagrelease.config import EvalTask

__all__ = ["BenchmarkSpec", "GateReport", "GateRow", "pct", "pct_pair", "round_p"]

_VERDICT_ORDER = ("inconsistent", "inconclusive", "consistent")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Which benchmark to gate, and how to read it.

    Attributes:
        name: lm-eval task or group name.
        label: row label (default: the name).
        metric: lm-eval metric (default: the first one logged).
        filter: lm-eval filter (default: ``none`` if logged, else the first).
    """

    name: str
    label: str | None = None
    metric: str | None = None
    filter: str | None = None

    @classmethod
    def from_task(cls, task: EvalTask) -> BenchmarkSpec:
        """The spec of a release config's eval task."""
        return cls(task.name, task.label, task.metric, task.filter)


def pct(x: float | None, digits: int = 2) -> float | None:
    """A fraction as a rounded percentage."""
    return None if x is None else round(100 * x, digits)


def pct_pair(pair: tuple[float, float] | None) -> list[float] | None:
    """An interval of fractions as rounded percentages."""
    return None if pair is None else [round(100 * pair[0], 2), round(100 * pair[1], 2)]


def round_p(p: float) -> float:
    """A p-value to four significant digits."""
    if p == 0 or not math.isfinite(p):
        return p
    return float(f"{p:.4g}")


@dataclass
class GateRow:
    """One benchmark's verdict.  Scores are percent; differences percentage points.

    ``unpaired`` rows compare with a published reference score (no per-item data on the
    reference side): ``power`` is the chance such a test had to show equivalence, and
    ``reference_n`` the items behind the published score.  ``rule`` is ``absolute`` (TOST
    against the margin) or ``relative`` (FlagRelease's relative drop, ``relative_drop``).
    """

    task: str
    label: str
    metric: str | None
    filter: str | None = None
    reference: float | None = None
    target: float | None = None
    reference_ci: list[float] | None = None
    target_ci: list[float] | None = None
    diff: float | None = None
    diff_ci: list[float] | None = None
    n_items: int = 0
    samples_per_item: int = 0
    test: str | None = None
    p_value: float | None = None
    tost_p: float | None = None
    verdict: str = "missing"
    more_items_needed: int | None = None
    more_samples_needed: int | None = None
    unmatched: dict[str, int] = field(default_factory=dict)
    note: str = ""
    unpaired: bool = False
    power: float | None = None
    reference_n: int | None = None
    rule: str = "absolute"
    relative_drop: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as in ``gate_results.json``."""
        return {
            "task": self.task,
            "label": self.label,
            "metric": self.metric,
            "filter": self.filter,
            "reference": self.reference,
            "target": self.target,
            "reference_ci": self.reference_ci,
            "target_ci": self.target_ci,
            "diff": self.diff,
            "diff_ci": self.diff_ci,
            "n_items": self.n_items,
            "samples_per_item": self.samples_per_item,
            "test": self.test,
            "p_value": self.p_value,
            "tost_p": self.tost_p,
            "verdict": self.verdict,
            "more_items_needed": self.more_items_needed,
            "more_samples_needed": self.more_samples_needed,
            "unmatched": self.unmatched,
            "note": self.note,
            "unpaired": self.unpaired,
            "power": self.power,
            "reference_n": self.reference_n,
            "rule": self.rule,
            "relative_drop": self.relative_drop,
        }


@dataclass
class GateReport:
    """The verdict over every benchmark.

    Attributes:
        reference_label, target_label: names of the two columns (card titles).
        reference_chip, target_chip: chip profile names, if known.
        margin: equivalence margin, percentage points.
        alpha: level of each one-sided test.
        rows: one per benchmark.
        throughput: the FlagGems on/off throughput gate, if measured.
        flaggems: the FlagGems on-vs-off gate and the bisection's findings, if run.
        rule: ``absolute`` or ``relative``.
        relative_margin: the relative rule's largest drop, percent of the reference.
    """

    reference_label: str
    target_label: str
    margin: float
    alpha: float
    rows: list[GateRow]
    reference_chip: str | None = None
    target_chip: str | None = None
    throughput: dict[str, Any] | None = None
    flaggems: dict[str, Any] | None = None
    rule: str = "absolute"
    relative_margin: float | None = None

    @property
    def verdict(self) -> str:
        """inconsistent if any benchmark is; else inconclusive if any is; else consistent.

        ``missing`` when no benchmark could be compared at all.
        """
        verdicts = {r.verdict for r in self.rows}
        for v in _VERDICT_ORDER:
            if v in verdicts:
                return v
        return "missing"

    @property
    def missing(self) -> list[str]:
        """Labels of benchmarks missing on either side."""
        return [r.label for r in self.rows if r.verdict == "missing"]

    @property
    def unpaired(self) -> bool:
        """Whether the reference is published scores (every compared row is unpaired)."""
        return any(r.unpaired for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        """The report in the "Gate results JSON" format (docs/ARCHITECTURE.md)."""
        return {
            "reference": {"label": self.reference_label, "chip": self.reference_chip},
            "target": {"label": self.target_label, "chip": self.target_chip},
            "margin": self.margin,
            "alpha": self.alpha,
            "diff_ci_level": round(1 - 2 * self.alpha, 4),
            "rule": self.rule,
            "relative_margin": self.relative_margin,
            "unpaired": self.unpaired,
            "rows": [r.to_json() for r in self.rows],
            "verdict": self.verdict,
            "throughput": self.throughput,
            "flaggems": self.flaggems,
            "missing": self.missing,
        }

    def _rule_text(self) -> str:
        if self.rule == "relative":
            return f"relative rule: a drop of at most {self.relative_margin:g}% of the reference"
        test = "TOST, unpaired: published reference scores" if self.unpaired else "TOST on the paired difference"
        return f"margin ±{self.margin:g} pts, alpha {self.alpha:g}; {test}"

    def to_text(self) -> str:
        """A readable table, then the verdict and what would decide inconclusive rows."""
        head = [
            "Benchmark",
            self.reference_label,
            self.target_label,
            "Diff (pts)",
            f"{round(100 * (1 - 2 * self.alpha))}% CI",
            "n x k",
            "p (diff)",
            "p (TOST)",
            "Verdict",
        ]
        table = [head]
        for r in self.rows:
            table.append(
                [
                    r.label,
                    _fmt(r.reference),
                    _fmt(r.target),
                    _fmt(r.diff, signed=True),
                    f"[{r.diff_ci[0]:+.2f}, {r.diff_ci[1]:+.2f}]" if r.diff_ci else "-",
                    f"{r.n_items} x {r.samples_per_item}" if r.n_items else "-",
                    _fmt_p(r.p_value),
                    _fmt_p(r.tost_p),
                    r.verdict + (" (unpaired)" if r.unpaired else ""),
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"Verdict: {self.verdict.upper()} ({self._rule_text()})")
        for r in self.rows:
            if r.verdict == "inconclusive" and r.rule == "absolute":
                more = []
                if r.more_items_needed:
                    more.append(f"about {r.more_items_needed} more items")
                if r.more_samples_needed:
                    more.append(f"about {r.more_samples_needed} more samples per item")
                lines.append(
                    f"  {r.label}: inconclusive; "
                    + (" or ".join(more) or "no sample size decides it")
                    + " would decide it"
                )
            if r.unpaired and r.power is not None:
                lines.append(f"  {r.label}: unpaired test; power to show equivalence {r.power:.0%}")
            if r.note:
                lines.append(f"  {r.label}: {r.note}")
        if self.throughput:
            lines.append(_throughput_text(self.throughput))
        if self.flaggems:
            f = self.flaggems
            lines.append(f"FlagGems on vs off: {f.get('on_vs_off', {}).get('verdict', 'not run')}")
            if f.get("blamed_ops"):
                lines.append(f"  operators to blame: {', '.join(f['blamed_ops'])}")
                lines.append(f"  proposed serve.flaggems.excluded_ops: {f.get('proposed_excluded_ops')}")
        return "\n".join(lines)


def _throughput_text(t: dict[str, Any]) -> str:
    head = f"Throughput FlagGems on/off: {t['gems_on_tok_s']} / {t['gems_off_tok_s']} tok/s = {t['ratio']}"
    if t.get("ratio_ci"):
        lo, hi = t["ratio_ci"]
        return (
            f"{head}, {round(100 * float(t['ci_level']))}% CI [{lo}, {hi}] over {t['rounds']} rounds "
            f"(min {t['min_ratio']}): {str(t['verdict']).upper()}"
        )
    return f"{head} (min {t['min_ratio']}): {'ok' if t['ok'] else 'FAILED'}"


def _fmt(x: float | None, *, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"
