"""The consistency gate: is the target's accuracy the reference's, within a margin?

:func:`gate_dirs` compares two lm-eval ``--log_samples`` folders benchmark by benchmark.
Items are joined on (task, doc id) and must carry the same prompt hash on both sides;
each benchmark gets its two scores with intervals, the paired difference with its
``1 - 2 alpha`` interval, McNemar's exact test (binary scores, one sample per item) or
a paired bootstrap, and a TOST equivalence verdict against the margin (percentage
points): consistent, inconsistent or inconclusive -- with, for the last, how many more
items (or samples per item) would decide.  The statistics live in :mod:`flagrelease.gate.stats`.

:func:`run_stage` gates the release: target vs reference, FlagGems on vs off (the same
accuracy gate plus a throughput ratio), and, when FlagGems is to blame, bisects the
operators (:mod:`flagrelease.gate.bisect`).  It writes ``reports/gate_results.json`` in the
format of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json
from flagrelease._redact import redact_obj
from flagrelease.bundle import release_labels
from flagrelease.config import EvalTask
from flagrelease.errors import GateError
from flagrelease.gate.stats import paired_comparison
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.samples import (
    BenchmarkSamples,
    SamplesError,
    benchmark_of,
    find_samples,
    group_parents,
    read_benchmark,
)

__all__ = [
    "BenchmarkSpec",
    "GateReport",
    "GateRow",
    "compare_benchmark",
    "gate_dirs",
    "run_stage",
]

log = logging.getLogger("flagrelease.gate")

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


def _pct(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(100 * x, digits)


def _pct_pair(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [round(100 * pair[0], 2), round(100 * pair[1], 2)]


@dataclass
class GateRow:
    """One benchmark's verdict.  Scores are percent; differences percentage points."""

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

    def to_json(self) -> dict[str, Any]:
        """The report in the "Gate results JSON" format (docs/ARCHITECTURE.md)."""
        return {
            "reference": {"label": self.reference_label, "chip": self.reference_chip},
            "target": {"label": self.target_label, "chip": self.target_chip},
            "margin": self.margin,
            "alpha": self.alpha,
            "diff_ci_level": round(1 - 2 * self.alpha, 4),
            "rows": [r.to_json() for r in self.rows],
            "verdict": self.verdict,
            "throughput": self.throughput,
            "flaggems": self.flaggems,
            "missing": self.missing,
        }

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
                    r.verdict,
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(
            f"Verdict: {self.verdict.upper()} (margin ±{self.margin:g} pts, alpha {self.alpha:g}; "
            f"TOST on the paired difference)"
        )
        for r in self.rows:
            if r.verdict == "inconclusive":
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
            if r.note:
                lines.append(f"  {r.label}: {r.note}")
        if self.throughput:
            t = self.throughput
            lines.append(
                f"Throughput FlagGems on/off: {t['gems_on_tok_s']} / {t['gems_off_tok_s']} tok/s = "
                f"{t['ratio']} (min {t['min_ratio']}): {'ok' if t['ok'] else 'FAILED'}"
            )
        if self.flaggems:
            f = self.flaggems
            lines.append(f"FlagGems on vs off: {f.get('on_vs_off', {}).get('verdict', 'not run')}")
            if f.get("blamed_ops"):
                lines.append(f"  operators to blame: {', '.join(f['blamed_ops'])}")
                lines.append(f"  proposed serve.flaggems.excluded_ops: {f.get('proposed_excluded_ops')}")
        return "\n".join(lines)


def _fmt(x: float | None, *, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _check_prompts(ref: BenchmarkSamples, tgt: BenchmarkSamples, keys: Sequence[tuple[str, int]]) -> None:
    bad_prompt: dict[str, list[int]] = {}
    bad_gen: dict[str, list[int]] = {}
    for key in keys:
        r, t = ref.items[key], tgt.items[key]
        if r.prompt_hash != t.prompt_hash:
            bad_prompt.setdefault(key[0], []).append(key[1])
        elif r.gen_hash != t.gen_hash:
            bad_gen.setdefault(key[0], []).append(key[1])

    def listing(bad: dict[str, list[int]]) -> str:
        parts = []
        for task, ids in sorted(bad.items()):
            shown = ", ".join(str(i) for i in sorted(ids)[:10])
            parts.append(f"task {task} doc ids {shown}" + (f" (+{len(ids) - 10} more)" if len(ids) > 10 else ""))
        return "; ".join(parts)

    if bad_prompt:
        raise GateError(
            f"benchmark {ref.name}: the reference and the target were given different prompts for "
            f"{listing(bad_prompt)}. Both must be run with the same lm-eval version, task definitions, few-shot "
            "settings and chat template; re-run the one that differs"
        )
    if bad_gen:
        raise GateError(
            f"benchmark {ref.name}: the reference and the target used different generation settings for "
            f"{listing(bad_gen)}. Re-run both with the same eval.generation (temperature, top_p, max_tokens)"
        )


def compare_benchmark(
    reference: BenchmarkSamples | None,
    *,
    target: BenchmarkSamples | None,
    spec: BenchmarkSpec,
    margin: float = 5.0,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> GateRow:
    """Gate one benchmark.

    Args:
        reference: the reference's items (None when it did not run the benchmark).
        target: the target's items.
        spec: the benchmark.
        margin: equivalence margin, percentage points.
        alpha: level of each one-sided test.
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        The row; verdict ``missing`` when either side has no items in common.

    Raises:
        GateError: the two sides' prompts (or generation settings) differ for some items.
    """
    label = spec.label or spec.name
    either = target or reference
    row = GateRow(
        task=spec.name,
        label=label,
        metric=either.metric if either else spec.metric,
        filter=either.filter if either else spec.filter,
    )
    if reference is None or target is None:
        side = "reference" if reference is None else "target"
        row.note = f"no samples from the {side}"
        one = target or reference
        if one is not None and one.items:
            means = [sum(i.scores) / len(i.scores) for i in one.items.values()]
            value = round(100 * sum(means) / len(means), 2)
            if reference is None:
                row.target = value
            else:
                row.reference = value
        return row
    if reference.metric != target.metric or reference.filter != target.filter:
        raise GateError(
            f"benchmark {spec.name}: the reference is scored by {reference.metric}/{reference.filter} but the target "
            f"by {target.metric}/{target.filter}; set metric and filter for this task in eval.tasks"
        )
    keys = sorted(set(reference.items) & set(target.items))
    row.unmatched = {
        "reference_only": len(set(reference.items) - set(target.items)),
        "target_only": len(set(target.items) - set(reference.items)),
    }
    if not keys:
        row.note = "the reference and the target have no items in common"
        return row
    _check_prompts(reference, target, keys)
    ref_scores = [reference.items[k].scores for k in keys]
    tgt_scores = [target.items[k].scores for k in keys]
    try:
        cmp = paired_comparison(
            ref_scores, target=tgt_scores, margin=margin / 100, alpha=alpha, resamples=resamples, seed=seed
        )
    except ValueError as err:
        raise GateError(f"benchmark {spec.name}: {err}; the gate needs per-item scores in [0, 1]") from err
    row.reference, row.target = _pct(cmp.reference), _pct(cmp.target)
    row.reference_ci, row.target_ci = _pct_pair(cmp.reference_ci), _pct_pair(cmp.target_ci)
    row.diff, row.diff_ci = _pct(cmp.diff), _pct_pair(cmp.diff_ci)
    row.n_items, row.samples_per_item = cmp.n_items, cmp.samples_per_item
    row.test = cmp.test
    row.p_value = _round_p(cmp.p_value)
    row.tost_p = _round_p(cmp.tost_p)
    row.verdict = cmp.verdict
    row.more_items_needed = cmp.more_items_needed
    row.more_samples_needed = cmp.more_samples_needed
    if row.unmatched["reference_only"] or row.unmatched["target_only"]:
        row.note = (
            f"compared on the {len(keys)} items both sides ran ({row.unmatched['reference_only']} only in "
            f"the reference, {row.unmatched['target_only']} only in the target)"
        )
    return row


def _round_p(p: float) -> float:
    if p == 0 or not math.isfinite(p):
        return p
    return float(f"{p:.4g}")


def _specs_from_dirs(*roots: Path) -> list[BenchmarkSpec]:
    names: dict[str, None] = {}
    for root in roots:
        parents = group_parents(root)
        for leaf in find_samples(root):
            names.setdefault(benchmark_of(leaf, parents))
    return [BenchmarkSpec(n) for n in sorted(names)]


def gate_dirs(
    reference: Path,
    *,
    target: Path,
    margin: float = 5.0,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
    tasks: Sequence[BenchmarkSpec | EvalTask] | None = None,
    reference_label: str | None = None,
    target_label: str | None = None,
    reference_chip: str | None = None,
    target_chip: str | None = None,
) -> GateReport:
    """Gate two lm-eval ``--log_samples`` output folders against each other.

    Args:
        reference: the reference's output folder (searched recursively).
        target: the target's output folder.
        margin: equivalence margin in percentage points (FlagRelease's rule: 5).
        alpha: level of each one-sided test (the difference interval is ``1 - 2 alpha``).
        resamples: bootstrap resamples.
        seed: bootstrap seed.
        tasks: the benchmarks to gate (default: every top-level task or group found).
        reference_label, target_label: column names (default: the folder names).
        reference_chip, target_chip: chip names recorded in the report.

    Returns:
        The report.

    Raises:
        GateError: a folder is missing or holds no samples, or prompts differ.
    """
    reference, target = Path(reference), Path(target)
    for side, root in (("reference", reference), ("target", target)):
        if not root.is_dir():
            raise GateError(f"{side} folder {root} does not exist")
        if not find_samples(root):
            raise GateError(
                f"{side} folder {root} holds no lm-eval samples_*.jsonl files; run lm-eval with "
                "--log_samples --output_path there"
            )
    if margin <= 0:
        raise GateError(f"margin must be positive percentage points, got {margin}")
    specs = (
        [t if isinstance(t, BenchmarkSpec) else BenchmarkSpec.from_task(t) for t in tasks]
        if tasks
        else (_specs_from_dirs(reference, target))
    )
    ref_samples, tgt_samples = find_samples(reference), find_samples(target)
    ref_parents, tgt_parents = group_parents(reference), group_parents(target)
    rows = []
    for i, spec in enumerate(specs):
        try:
            ref = read_benchmark(
                reference,
                name=spec.name,
                metric=spec.metric,
                filter=spec.filter,
                samples=ref_samples,
                parents=ref_parents,
            )
            tgt = read_benchmark(
                target,
                name=spec.name,
                metric=spec.metric or (ref.metric if ref else None),
                filter=spec.filter or (ref.filter if ref else None),
                samples=tgt_samples,
                parents=tgt_parents,
            )
        except SamplesError as err:
            raise GateError(str(err)) from err
        rows.append(
            compare_benchmark(
                ref, target=tgt, spec=spec, margin=margin, alpha=alpha, resamples=resamples, seed=seed + 7919 * i
            )
        )
    return GateReport(
        reference_label=reference_label or reference.name,
        target_label=target_label or target.name,
        margin=margin,
        alpha=alpha,
        rows=rows,
        reference_chip=reference_chip,
        target_chip=target_chip,
    )


def _broken_target_report(
    reference: Path,
    *,
    error: str,
    tasks: Sequence[BenchmarkSpec],
    margin: float,
    alpha: float,
    resamples: int,
    reference_label: str,
    target_label: str,
    reference_chip: str | None,
    target_chip: str | None,
) -> GateReport:
    """The report when the target computed NaN/inf: every benchmark is inconsistent."""
    rows = []
    samples, parents = find_samples(reference), group_parents(reference)
    for spec in tasks:
        try:
            ref = read_benchmark(
                reference, name=spec.name, metric=spec.metric, filter=spec.filter, samples=samples, parents=parents
            )
        except SamplesError as err:
            raise GateError(str(err)) from err
        row = compare_benchmark(ref, target=None, spec=spec, margin=margin, alpha=alpha, resamples=resamples)
        row.verdict = "inconsistent"
        row.note = f"the target computed NaN or infinite values: {error}"
        rows.append(row)
    return GateReport(
        reference_label=reference_label,
        target_label=target_label,
        margin=margin,
        alpha=alpha,
        rows=rows,
        reference_chip=reference_chip,
        target_chip=target_chip,
    )


def _throughput(on: float | None, off: float | None, min_ratio: float) -> dict[str, Any] | None:
    if on is None or off is None:
        return None
    ratio = on / off if off > 0 else math.inf
    return {
        "gems_on_tok_s": round(on, 2),
        "gems_off_tok_s": round(off, 2),
        "ratio": round(ratio, 3) if math.isfinite(ratio) else None,
        "min_ratio": min_ratio,
        "ok": bool(ratio >= min_ratio),
    }


def _table(report: GateReport, comparison: str) -> list[dict[str, Any]]:
    return [
        {
            "comparison": comparison,
            "benchmark": r.label,
            "reference": r.reference,
            "target": r.target,
            "diff_pts": r.diff,
            "diff_ci": f"[{r.diff_ci[0]:+.2f}, {r.diff_ci[1]:+.2f}]" if r.diff_ci else None,
            "n_items": r.n_items,
            "k": r.samples_per_item,
            "p": r.p_value,
            "tost_p": r.tost_p,
            "verdict": r.verdict,
            "more_items_needed": r.more_items_needed,
        }
        for r in report.rows
    ]


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Gate the release on the eval stage's variants; write ``reports/gate_results.json``.

    Returns:
        outputs ``results``, ``verdict``, ``throughput_ok``, ``blamed_ops``,
        ``proposed_excluded_ops``; table ``gate``.  Status ``failed`` when the verdict is
        inconsistent or the throughput gate fails, ``warning`` when inconclusive.
    """
    cfg = ctx.config
    g = cfg.gates
    ref_label, tgt_label = release_labels(cfg)
    if ctx.dry_run:
        return StageResult(
            "gate",
            f"Would gate {tgt_label} against {ref_label}: paired TOST, margin "
            f"{g.accuracy_margin} pts, alpha {g.alpha}; FlagGems on/off throughput >= "
            f"{g.throughput_min_ratio}.",
            outputs={"results": None, "verdict": None},
        )
    variants: dict[str, Any] = ctx.result("eval").outputs.get("variants") or {}
    if "target" not in variants or "reference" not in variants:
        return StageResult(
            "gate",
            "The eval stage produced no target and reference results; nothing to gate.",
            outputs={
                "results": None,
                "verdict": None,
                "throughput_ok": None,
                "blamed_ops": [],
                "proposed_excluded_ops": [],
            },
            status="skipped",
        )
    tasks = [BenchmarkSpec.from_task(t) for t in cfg.eval.tasks]
    common: dict[str, Any] = {
        "margin": g.accuracy_margin,
        "alpha": g.alpha,
        "resamples": g.bootstrap_resamples,
        "tasks": tasks,
    }
    for name in ("reference", "target_gems_off"):
        if (variants.get(name) or {}).get("error"):
            raise GateError(
                f"the {name} variant failed in the eval stage ({variants[name]['error']}); fix it and "
                "re-run the eval stage",
                model=cfg.name,
                chip=cfg.chip,
            )
    ref_dir = Path(variants["reference"]["dir"])
    target_error = variants["target"].get("error")
    tgt_dir = None if target_error else Path(variants["target"]["dir"])
    if tgt_dir is None:
        report = _broken_target_report(
            ref_dir,
            error=str(target_error),
            reference_label=ref_label,
            target_label=tgt_label,
            reference_chip=cfg.eval.reference.chip,
            target_chip=cfg.chip,
            **common,
        )
    else:
        report = gate_dirs(
            ref_dir,
            target=tgt_dir,
            reference_label=ref_label,
            target_label=tgt_label,
            reference_chip=cfg.eval.reference.chip,
            target_chip=cfg.chip,
            **common,
        )
    tables = {"gate": _table(report, "target vs reference")}
    blamed: list[str] = []
    proposed: list[str] = list(cfg.serve.flaggems.excluded_ops)
    off = variants.get("target_gems_off")
    if off is not None:
        off_dir = Path(off["dir"])
        on_labels: dict[str, Any] = {
            "reference_label": f"{tgt_label} (FlagGems off)",
            "target_label": f"{tgt_label} (FlagGems on)",
            "reference_chip": cfg.chip,
            "target_chip": cfg.chip,
        }
        if tgt_dir is None:
            on_off = _broken_target_report(off_dir, error=str(target_error), **on_labels, **common)
        else:
            on_off = gate_dirs(off_dir, target=tgt_dir, **on_labels, **common)
        tables["gate"] += _table(on_off, "FlagGems on vs off")
        report.throughput = _throughput(
            variants["target"].get("throughput"), off.get("throughput"), g.throughput_min_ratio
        )
        flaggems: dict[str, Any] = {
            "on_vs_off": {"verdict": on_off.verdict, "rows": [r.to_json() for r in on_off.rows]},
            "blamed_ops": [],
            "proposed_excluded_ops": proposed,
        }
        if target_error:
            flaggems["target_error"] = target_error
        gems_to_blame = on_off.verdict == "inconsistent"
        if not gems_to_blame and report.verdict == "inconsistent":
            off_ref = gate_dirs(ref_dir, target=off_dir, **common)
            flaggems["off_vs_reference"] = {"verdict": off_ref.verdict}
            gems_to_blame = off_ref.verdict == "consistent"
        flaggems["to_blame"] = gems_to_blame
        if gems_to_blame and g.bisect_on_failure:
            from flagrelease.gate.bisect import bisect_release

            ctx.progress("gate", 0.5, "FlagGems changes the answers: bisecting its operators")
            found = bisect_release(ctx, variants=variants)
            blamed = found.blamed_ops
            proposed = found.proposed_excluded_ops
            flaggems.update(blamed_ops=blamed, proposed_excluded_ops=proposed, bisection=found.to_json())
        report.flaggems = flaggems
    path = atomic_write_json(ctx.layout.reports_dir / "gate_results.json", redact_obj(report.to_json()))
    throughput_ok = report.throughput["ok"] if report.throughput else None
    failed = report.verdict == "inconsistent" or throughput_ok is False
    status = "failed" if failed else ("ok" if report.verdict == "consistent" else "warning")
    summary = f"{tgt_label} vs {ref_label}: {report.verdict}"
    if report.throughput:
        t = report.throughput
        summary += f"; FlagGems on/off throughput {t['ratio']} ({'ok' if t['ok'] else 'below'} {t['min_ratio']})"
    if blamed:
        summary += f"; FlagGems operators to blame: {', '.join(blamed)}"
    log.info("gate: %s", summary)
    return StageResult(
        "gate",
        summary + ".",
        outputs={
            "results": str(path),
            "verdict": report.verdict,
            "throughput_ok": throughput_ok,
            "blamed_ops": blamed,
            "proposed_excluded_ops": proposed,
        },
        tables=tables,
        status=status,
    )
