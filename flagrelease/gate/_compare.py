"""Comparing two runs benchmark by benchmark: paired lm-eval logs, or a target against published scores.

:func:`gate_dirs` compares two lm-eval ``--log_samples`` folders benchmark by benchmark.
Items are joined on (task, doc id) and must carry the same prompt hash on both sides;
each benchmark gets its two scores with intervals, the paired difference with its
``1 - 2 alpha`` interval, McNemar's exact test (binary scores, one sample per item) or
a paired bootstrap, and a TOST equivalence verdict against the margin (percentage
points): consistent, inconsistent or inconclusive -- with, for the last, how many more
items (or samples per item) would decide.  :func:`gate_scores` does the same against a
reference known only by published scores, with an unpaired test.  ``rule="relative"``
gives FlagRelease's verdict instead (a relative drop, with its noise zone); the
statistics are reported either way.  The statistics live in :mod:`flagrelease.gate.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagrelease.config import EvalTask
from flagrelease.errors import GateError
from flagrelease.gate._report import BenchmarkSpec, GateReport, GateRow, pct, pct_pair, round_p
from flagrelease.gate.stats import paired_comparison, relative_verdict, unpaired_comparison
from flagrelease.samples import (
    BenchmarkSamples,
    ReferenceScores,
    SamplesError,
    benchmark_of,
    find_samples,
    group_parents,
    read_benchmark,
)

__all__ = ["Rule", "broken_target_report", "compare_benchmark", "gate_dirs", "gate_scores"]


@dataclass(frozen=True)
class Rule:
    """How a row's verdict is decided.

    Attributes:
        kind: ``absolute`` (TOST of the difference against the margin in points) or
            ``relative`` (FlagRelease: a drop of at most ``relative_margin`` percent of
            the reference; a gap of at most ``noise_items`` items on at most
            ``noise_max_n`` items means retest).
        relative_margin: percent of the reference.
        noise_items: the noise zone's largest gap, in items.
        noise_max_n: the noise zone's largest benchmark, in items.
    """

    kind: str = "absolute"
    relative_margin: float = 5.0
    noise_items: int = 2
    noise_max_n: int = 100

    def __post_init__(self) -> None:
        if self.kind not in ("absolute", "relative"):
            raise GateError(f"unknown gate rule {self.kind!r}; rules: absolute, relative")

    def apply(self, row: GateRow, *, reference: float, target: float) -> None:
        """Replace ``row``'s verdict by the relative rule's (absolute: leave it).

        Args:
            row: the row, with its statistics.
            reference, target: the two scores as fractions, unrounded.
        """
        if self.kind != "relative":
            return
        verdict, drop, note = relative_verdict(
            reference,
            target=target,
            n_items=row.n_items,
            max_drop=self.relative_margin / 100,
            noise_items=self.noise_items,
            noise_max_n=self.noise_max_n,
        )
        row.rule = "relative"
        row.verdict = verdict
        row.relative_drop = None if drop is None else round(100 * drop, 2)
        row.more_items_needed = row.more_samples_needed = None
        if note:
            row.note = f"{row.note}; {note}" if row.note else note


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
    rule: Rule | None = None,
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
        rule: how the verdict is decided (default: absolute).

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
    row.reference, row.target = pct(cmp.reference), pct(cmp.target)
    row.reference_ci, row.target_ci = pct_pair(cmp.reference_ci), pct_pair(cmp.target_ci)
    row.diff, row.diff_ci = pct(cmp.diff), pct_pair(cmp.diff_ci)
    row.n_items, row.samples_per_item = cmp.n_items, cmp.samples_per_item
    row.test = cmp.test
    row.p_value = round_p(cmp.p_value)
    row.tost_p = round_p(cmp.tost_p)
    row.verdict = cmp.verdict
    row.more_items_needed = cmp.more_items_needed
    row.more_samples_needed = cmp.more_samples_needed
    if row.unmatched["reference_only"] or row.unmatched["target_only"]:
        row.note = (
            f"compared on the {len(keys)} items both sides ran ({row.unmatched['reference_only']} only in "
            f"the reference, {row.unmatched['target_only']} only in the target)"
        )
    (rule or Rule()).apply(row, reference=cmp.reference, target=cmp.target)
    return row


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
    rule: Rule | None = None,
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
        rule: how each verdict is decided (default: absolute).

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
                ref,
                target=tgt,
                spec=spec,
                margin=margin,
                alpha=alpha,
                resamples=resamples,
                seed=seed + 7919 * i,
                rule=rule,
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
        **_rule_fields(rule),
    )


def _rule_fields(rule: Rule | None) -> dict[str, Any]:
    rule = rule or Rule()
    return {"rule": rule.kind, "relative_margin": rule.relative_margin if rule.kind == "relative" else None}


def _read_target(target: Path, spec: BenchmarkSpec) -> BenchmarkSamples | None:
    try:
        return read_benchmark(target, name=spec.name, metric=spec.metric, filter=spec.filter)
    except SamplesError as err:
        raise GateError(str(err)) from err


def _published_row(spec: BenchmarkSpec, reference: ReferenceScores) -> GateRow:
    """A row holding only the published reference score (no target)."""
    found = reference.scores.get(spec.name)
    row = GateRow(task=spec.name, label=spec.label or spec.name, metric=spec.metric, filter=spec.filter, unpaired=True)
    if found is not None:
        row.reference, row.reference_n = found.score, found.n
    return row


def gate_scores(
    reference: ReferenceScores,
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
    rule: Rule | None = None,
) -> GateReport:
    """Gate an lm-eval ``--log_samples`` folder against published reference scores (unpaired).

    Without the reference's per-item answers nothing can be paired: each benchmark gets
    statsmodels' TOST of two independent proportions (:func:`flagrelease.gate.stats.unpaired_comparison`),
    marked ``unpaired`` with the power it had.  Where the published score gives no item
    count, the reference is assumed to have run the target's items (noted in the row).

    Args:
        reference: the published scores (:func:`flagrelease.samples.load_reference_scores`).
        target: the target's output folder.
        margin: equivalence margin in percentage points.
        alpha: level of each one-sided test.
        resamples: bootstrap resamples (the target's interval when it has k > 1 samples).
        seed: random seed.
        tasks: the benchmarks (default: every published score the target also has).
        reference_label, target_label: column names (default: the file's label and the folder's name).
        reference_chip, target_chip: chip names recorded in the report (default: the file's chip).
        rule: how each verdict is decided (default: absolute).

    Raises:
        GateError: the target folder holds no samples.
    """
    target = Path(target)
    if not target.is_dir() or not find_samples(target):
        raise GateError(
            f"target folder {target} holds no lm-eval samples_*.jsonl files; run lm-eval with "
            "--log_samples --output_path there"
        )
    if margin <= 0:
        raise GateError(f"margin must be positive percentage points, got {margin}")
    if tasks:
        specs = [t if isinstance(t, BenchmarkSpec) else BenchmarkSpec.from_task(t) for t in tasks]
    else:
        specs = [BenchmarkSpec(n) for n in sorted(reference.scores) if n in {s.name for s in _specs_from_dirs(target)}]
    rows = []
    for i, spec in enumerate(specs):
        row = _published_row(spec, reference)
        tgt = _read_target(target, spec)
        published = reference.scores.get(spec.name)
        if tgt is not None:
            row.metric, row.filter = tgt.metric, tgt.filter
        if tgt is None or not tgt.items or published is None:
            row.note = f"no {'published reference score' if published is None else 'samples from the target'}"
            if tgt is not None and tgt.items:
                means = [sum(it.scores) / len(it.scores) for it in tgt.items.values()]
                row.target = round(100 * sum(means) / len(means), 2)
            rows.append(row)
            continue
        items = [tgt.items[k].scores for k in sorted(tgt.items)]
        try:
            cmp = unpaired_comparison(
                published.score / 100,
                target=items,
                margin=margin / 100,
                reference_n=published.n,
                alpha=alpha,
                resamples=resamples,
                seed=seed + 7919 * i,
            )
        except ValueError as err:
            raise GateError(f"benchmark {spec.name}: {err}; the gate needs per-item scores in [0, 1]") from err
        row.reference, row.target = published.score, pct(cmp.target)
        row.reference_ci, row.target_ci = pct_pair(cmp.reference_ci), pct_pair(cmp.target_ci)
        row.diff, row.diff_ci = pct(cmp.diff), pct_pair(cmp.diff_ci)
        row.n_items, row.samples_per_item = cmp.n_items, cmp.samples_per_item
        row.test, row.p_value, row.tost_p = cmp.test, round_p(cmp.p_value), round_p(cmp.tost_p)
        row.verdict, row.power, row.reference_n = cmp.verdict, round(cmp.power, 3), cmp.reference_n
        row.note = (
            "unpaired: the reference is a published score"
            + (f" whose item count is unknown (taken as the target's {cmp.n_items})" if cmp.reference_n_assumed else "")
            + f"; power to show equivalence {cmp.power:.0%}"
        )
        (rule or Rule()).apply(row, reference=published.score / 100, target=cmp.target)
        rows.append(row)
    return GateReport(
        reference_label=reference_label or reference.label or reference.path.stem,
        target_label=target_label or target.name,
        margin=margin,
        alpha=alpha,
        rows=rows,
        reference_chip=reference_chip or reference.chip,
        target_chip=target_chip,
        **_rule_fields(rule),
    )


def broken_target_report(
    reference: Path | ReferenceScores,
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
    rule: Rule | None = None,
) -> GateReport:
    """The report when the target computed NaN/inf or failed a probe: every benchmark is inconsistent."""
    rows = []
    if isinstance(reference, ReferenceScores):
        for spec in tasks:
            row = _published_row(spec, reference)
            row.verdict = "inconsistent"
            row.note = f"the target failed: {error}"
            rows.append(row)
    else:
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
            row.note = f"the target failed: {error}"
            rows.append(row)
    return GateReport(
        reference_label=reference_label,
        target_label=target_label,
        margin=margin,
        alpha=alpha,
        rows=rows,
        reference_chip=reference_chip,
        target_chip=target_chip,
        **_rule_fields(rule),
    )
