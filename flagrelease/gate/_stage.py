"""``run_stage`` of the gate stage (see :mod:`flagrelease.gate`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json
from flagrelease._redact import redact_obj
from flagrelease.bundle import release_labels
from flagrelease.errors import GateError
from flagrelease.evaluate.outputs import EvalOutputs, VariantOutputs
from flagrelease.gate._compare import Rule, broken_target_report, gate_dirs, gate_scores
from flagrelease.gate._report import BenchmarkSpec, GateReport
from flagrelease.gate._throughput import pick_metric, single_ratio, throughput_verdict
from flagrelease.gate.outputs import GateOutputs
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.samples import ReferenceScores, SamplesError, load_reference_scores

__all__ = ["run_stage"]

log = logging.getLogger("flagrelease.gate")


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


def _reference(ctx: ReleaseContext, ref: VariantOutputs) -> Path | ReferenceScores:
    if ref.scores_file:
        try:
            return load_reference_scores(Path(ref.scores_file))
        except SamplesError as err:
            raise GateError(str(err), model=ctx.config.name, chip=ctx.config.chip) from err
    assert ref.dir is not None
    return Path(ref.dir)


def _throughput(ctx: ReleaseContext, ev: EvalOutputs, off: VariantOutputs) -> dict[str, Any] | None:
    g = ctx.config.gates
    if ev.throughput is not None:
        metric = pick_metric(ev.throughput, setting=g.throughput.metric, chip=ctx.config.chip)
        found = throughput_verdict(
            ev.throughput,
            min_ratio=g.throughput_min_ratio,
            alpha=g.alpha,
            resamples=g.bootstrap_resamples,
            metric=metric,
        )
        if found is not None:
            return found
    # Eval results made without trials: the ratio of two single measurements, as before.
    return single_ratio(ev.variants["target"].throughput, off.throughput, g.throughput_min_ratio)


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Gate the release on the eval stage's variants; write ``reports/gate_results.json``.

    Returns:
        outputs :class:`~flagrelease.gate.outputs.GateOutputs`; table ``gate``.  Status
        ``failed`` when the verdict is inconsistent or the throughput verdict is fail,
        ``warning`` when either is inconclusive.
    """
    cfg = ctx.config
    g = cfg.gates
    ref_label, tgt_label = release_labels(cfg)
    if ctx.dry_run:
        how = (
            f"FlagRelease's relative rule (drop <= {g.relative_margin:g}% of the reference)"
            if g.rule == "relative"
            else f"{'unpaired' if cfg.eval.reference.mode == 'scores' else 'paired'} TOST, margin "
            f"{g.accuracy_margin} pts, alpha {g.alpha}"
        )
        return StageResult(
            "gate",
            f"Would gate {tgt_label} against {ref_label}: {how}; FlagGems on/off throughput >= "
            f"{g.throughput_min_ratio} ({g.throughput.trials} interleaved rounds).",
            outputs=GateOutputs(),
        )
    ev = ctx.result("eval", EvalOutputs)
    variants = ev.variants
    if "target" not in variants or "reference" not in variants:
        return StageResult(
            "gate",
            "The eval stage produced no target and reference results; nothing to gate.",
            outputs=GateOutputs(),
            status="skipped",
        )
    rule = Rule(g.rule, g.relative_margin, g.noise_zone_items, g.noise_zone_max_n)
    tasks = [BenchmarkSpec.from_task(t) for t in cfg.eval.tasks]
    common: dict[str, Any] = {
        "margin": g.accuracy_margin,
        "alpha": g.alpha,
        "resamples": g.bootstrap_resamples,
        "tasks": tasks,
        "rule": rule,
    }
    for name in ("reference", "target_gems_off"):
        if name in variants and variants[name].error:
            raise GateError(
                f"the {name} variant failed in the eval stage ({variants[name].error}); fix it and "
                "re-run the eval stage",
                model=cfg.name,
                chip=cfg.chip,
            )
    reference = _reference(ctx, variants["reference"])
    target_error = variants["target"].error
    tgt_dir = None if target_error else Path(str(variants["target"].dir))
    labels: dict[str, Any] = {
        "reference_label": ref_label,
        "target_label": tgt_label,
        "reference_chip": cfg.eval.reference.chip,
        "target_chip": cfg.chip,
    }
    if tgt_dir is None:
        report = broken_target_report(reference, error=str(target_error), **labels, **common)
    elif isinstance(reference, ReferenceScores):
        report = gate_scores(reference, target=tgt_dir, **labels, **common)
    else:
        report = gate_dirs(reference, target=tgt_dir, **labels, **common)
    tables = {"gate": _table(report, "target vs reference")}
    blamed: list[str] = []
    proposed: list[str] = list(cfg.serve.flaggems.excluded_ops)
    off = variants.get("target_gems_off")
    if off is not None:
        off_dir = Path(str(off.dir))
        on_labels: dict[str, Any] = {
            "reference_label": f"{tgt_label} (FlagGems off)",
            "target_label": f"{tgt_label} (FlagGems on)",
            "reference_chip": cfg.chip,
            "target_chip": cfg.chip,
        }
        if tgt_dir is None:
            on_off = broken_target_report(off_dir, error=str(target_error), **on_labels, **common)
        else:
            on_off = gate_dirs(off_dir, target=tgt_dir, **on_labels, **common)
        tables["gate"] += _table(on_off, "FlagGems on vs off")
        report.throughput = _throughput(ctx, ev, off)
        flaggems: dict[str, Any] = {
            "on_vs_off": {"verdict": on_off.verdict, "rows": [r.to_json() for r in on_off.rows]},
            "blamed_ops": [],
            "proposed_excluded_ops": proposed,
        }
        if target_error:
            flaggems["target_error"] = target_error
        gems_to_blame = on_off.verdict == "inconsistent"
        if not gems_to_blame and report.verdict == "inconsistent":
            if isinstance(reference, ReferenceScores):
                off_ref = gate_scores(reference, target=off_dir, **common)
            else:
                off_ref = gate_dirs(reference, target=off_dir, **common)
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
    thr = report.throughput
    throughput_ok = thr["ok"] if thr else None
    failed = report.verdict == "inconsistent" or throughput_ok is False
    unsure = report.verdict != "consistent" or (thr is not None and thr.get("verdict") == "inconclusive")
    status = "failed" if failed else ("warning" if unsure else "ok")
    summary = f"{tgt_label} vs {ref_label}: {report.verdict}" + (" (unpaired)" if report.unpaired else "")
    if thr:
        if thr.get("ratio_ci"):
            lo, hi = thr["ratio_ci"]
            summary += (
                f"; FlagGems on/off throughput {thr['ratio']} [{lo}, {hi}] over {thr['rounds']} rounds: "
                f"{thr['verdict']} (min {thr['min_ratio']})"
            )
        else:
            summary += (
                f"; FlagGems on/off throughput {thr['ratio']} ({'ok' if thr['ok'] else 'below'} {thr['min_ratio']})"
            )
    if blamed:
        summary += f"; FlagGems operators to blame: {', '.join(blamed)}"
    log.info("gate: %s", summary)
    return StageResult(
        "gate",
        summary + ".",
        outputs=GateOutputs(
            results=str(path),
            verdict=report.verdict,
            throughput_ok=throughput_ok,
            blamed_ops=blamed,
            proposed_excluded_ops=proposed,
        ),
        tables=tables,
        status=status,
    )
