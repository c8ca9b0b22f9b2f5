"""``run_stage`` of the eval stage (see :mod:`flagrelease.evaluate`)."""

from __future__ import annotations

import contextlib
import logging

from flagrelease.errors import EvalError
from flagrelease.evaluate._run import EvalRun, load_stored_run
from flagrelease.evaluate._tasks import check_tasks
from flagrelease.evaluate._throughput import Arm, measure_interleaved, servers_mode
from flagrelease.evaluate._variants import (
    FINDING_KINDS,
    ServerPool,
    VariantPlan,
    evaluate_live,
    plan_variants,
    serve_variant,
)
from flagrelease.evaluate.outputs import EvalOutputs, ThroughputOutputs, VariantOutputs
from flagrelease.evaluate.reference import publish_reference_run
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.roles import REFERENCE_ROLE
from flagrelease.samples import SamplesError, load_reference_scores

__all__ = ["run_stage"]

log = logging.getLogger("flagrelease.evaluate")

#: The two arms of the FlagGems on/off throughput trials.
_ARMS = ("target", "target_gems_off")


def _variant_output(plan: VariantPlan, run: EvalRun) -> VariantOutputs:
    return VariantOutputs(
        dir=str(run.dir),
        scores=run.scores,
        tasks=run.tasks,
        chip=plan.chip,
        weights=plan.weights,
        flaggems=plan.flaggems,
        excluded_ops=list(plan.excluded_ops),
        throughput=run.throughput,
        gems_ops=run.gems_ops,
        per_sample=str(run.per_sample),
        stored=str(plan.stored) if plan.stored else None,
        same_as=plan.same_as,
        probes=run.probes,
        truncated=run.truncated() if run.runs else None,
    )


def _failed_output(plan: VariantPlan, err: EvalError) -> VariantOutputs:
    return VariantOutputs(
        chip=plan.chip,
        weights=plan.weights,
        flaggems=plan.flaggems,
        excluded_ops=list(plan.excluded_ops),
        gems_ops=list(getattr(err, "gems_ops", [])),
        same_as=plan.same_as,
        probes={"truncation": getattr(err, "probe", None)} if getattr(err, "probe", None) else None,
        error=err.message,
        error_kind=getattr(err, "kind", None),
    )


def _scores_output(ctx: ReleaseContext, plan: VariantPlan) -> VariantOutputs:
    """The reference as published scores: no samples, no intervals; the gate tests it unpaired."""
    assert plan.scores is not None
    try:
        published = load_reference_scores(plan.scores)
    except SamplesError as err:
        raise EvalError(f"[{plan.name}] {err}", model=ctx.config.name) from err
    tasks = {}
    for task in ctx.config.eval.tasks:
        found = published.scores.get(task.name)
        if found is not None:
            tasks[task.name] = {
                "metric": task.metric,
                "filter": task.filter,
                "n_items": found.n,
                "samples_per_item": found.samples_per_item,
                "score": found.score,
            }
    return VariantOutputs(
        scores={k: v["score"] for k, v in tasks.items()},
        tasks=tasks,
        chip=plan.chip,
        weights=plan.weights,
        flaggems=plan.flaggems,
        scores_file=str(plan.scores),
    )


def _dry_run(plans: list[VariantPlan]) -> StageResult:
    def what(p: VariantPlan) -> str:
        if p.stored:
            return f"stored results {p.stored}"
        if p.scores:
            return f"published scores {p.scores}"
        if p.same_as:
            return f"same as {p.same_as}"
        return f"serve {p.weights} weights on {p.chip}, FlagGems {'on' if p.flaggems else 'off'}"

    return StageResult(
        "eval",
        "Would evaluate " + "; ".join(f"{p.name}: {what(p)}" for p in plans) + ".",
        outputs=EvalOutputs(plan=[p.name for p in plans]),
    )


def _throughput_trials(
    ctx: ReleaseContext, plans: dict[str, VariantPlan], pool: ServerPool | None
) -> ThroughputOutputs:
    """FlagGems on vs off, interleaved, on the same serving set-up, after both evals.

    With a ``pool`` (``servers: both``) the trials run on the two servers the evals used,
    kept up for them (no eval runs any more); without, each arm is served afresh, one at
    a time (``alternate``).
    """
    cfg = ctx.config
    settings = cfg.gates.throughput
    arms = [
        Arm(
            name,
            (lambda p=plans[name]: pool.serve(p, keep=True))  # type: ignore[misc]
            if pool is not None
            else (lambda p=plans[name]: serve_variant(ctx, plan=p, label=f"{p.name}-throughput")),  # type: ignore[misc]
        )
        for name in _ARMS
    ]
    data = measure_interleaved(
        arms,
        settings=settings,
        concurrency=settings.concurrency or cfg.eval.concurrency,
        prompt=cfg.serve.load_test.prompt,
        load_test=ctx.hook("load_test"),
        servers="both" if pool is not None else "alternate",
        progress=lambda f, m: ctx.progress("eval", 0.9 + 0.1 * f, m),
    )
    return ThroughputOutputs.model_validate(data)


def _arm_mean(throughput: ThroughputOutputs, arm: str) -> float | None:
    values = [t.tok_s for t in throughput.trials if t.arm == arm]
    return round(sum(values) / len(values), 2) if values else None


def _evaluate_variants(
    ctx: ReleaseContext, plans: list[VariantPlan], *, pool: ServerPool | None, trials_planned: bool
) -> tuple[dict[str, VariantOutputs], dict[str, EvalRun]]:
    """Evaluate each variant in turn; the variants in ``plans``' order.

    With a ``pool`` (two servers fit at once), the served variants other than the
    throughput arms go first, each next server starts while the previous eval runs, and
    the arms' servers are kept for the trials: at most two servers are up at a time.
    """
    cfg = ctx.config
    compared = "target_gems_off" in {p.name for p in plans}
    runs: dict[str, EvalRun] = {}
    variants: dict[str, VariantOutputs] = {}
    order = plans
    if pool is not None:
        first = [p for p in plans if p.served and p.name not in _ARMS]
        order = first + [p for p in plans if p not in first]
    served = [p for p in order if p.served]
    for i, plan in enumerate(order):
        ctx.progress("eval", 0.9 * i / len(order), f"evaluating {plan.name}")
        out_dir = ctx.layout.eval_dir / plan.name
        if plan.stored is not None:
            run = load_stored_run(plan.stored, tasks=cfg.eval.tasks, out_dir=out_dir, variant=plan.name)
        elif plan.scores is not None:
            variants[plan.name] = _scores_output(ctx, plan)
            continue
        elif plan.same_as is not None:
            if plan.same_as not in runs:  # that variant failed; so does this one
                variants[plan.name] = variants[plan.same_as].model_copy(update={"same_as": plan.same_as})
                continue
            run = runs[plan.same_as]
        else:
            try:
                # The two arms get their throughput from the interleaved trials instead.
                arm = trials_planned and plan.name in _ARMS
                after = served[served.index(plan) + 1 :]
                run = evaluate_live(
                    ctx,
                    plan,
                    out_dir=out_dir,
                    throughput=not arm,
                    serve=None if pool is None else (lambda p=plan, k=arm: pool.serve(p, keep=k)),  # type: ignore[misc]
                    alongside=(lambda n=after[0]: pool.ahead(n)) if pool is not None and after else None,  # type: ignore[misc]
                )
            except EvalError as err:
                # A FlagGems-on serve that computes NaN/inf or fails a probe is a finding for
                # the gate (which then bisects the operators against FlagGems off).
                if getattr(err, "kind", None) not in FINDING_KINDS or not plan.flaggems or not compared:
                    raise
                log.warning("%s", err.message)
                variants[plan.name] = _failed_output(plan, err)
                continue
        runs[plan.name] = run
        variants[plan.name] = _variant_output(plan, run)
    return {p.name: variants[p.name] for p in plans if p.name in variants}, runs


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Evaluate every variant of the release (see :mod:`flagrelease.evaluate`).

    Each served variant is probed first (one stability request, then the truncation
    probe).  A FlagGems-on variant that computes NaN or infinite values, or fails a
    probe, is recorded with an ``error`` (and no scores) when FlagGems off is evaluated
    too, so that the gate can judge it and bisect the operators; every other failure
    raises.  Once every variant is evaluated, FlagGems on and off are measured in
    interleaved throughput trials (``gates.throughput``) for the gate's throughput verdict.

    Returns:
        outputs :class:`~flagrelease.evaluate.outputs.EvalOutputs`: ``variants`` by name
        (dir, scores in percent, chip, weights, flaggems, throughput in output tokens/s,
        probes ...) and ``throughput`` (every trial); table ``eval``: one row per variant
        and task.
    """
    cfg = ctx.config
    if not cfg.eval.tasks:
        return StageResult(
            "eval", "No eval tasks configured; nothing evaluated.", outputs=EvalOutputs(), status="skipped"
        )
    plans = plan_variants(ctx)
    if ctx.dry_run:
        return _dry_run(plans)
    check_tasks([t.name for t in cfg.eval.tasks], include_path=cfg.eval.include_path)
    ctx.layout.eval_dir.mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in plans}
    trials_planned = all(n in by_name for n in _ARMS)
    # Where two servers fit at once (servers: both), the next server starts during an eval,
    # and the two arms' servers stay up after their evals for the throughput trials.
    both = servers_mode(cfg.gates.throughput, chip=cfg.chip) == "both"
    with ServerPool(ctx) if both else contextlib.nullcontext() as pool:
        variants, runs = _evaluate_variants(ctx, plans, pool=pool, trials_planned=trials_planned)
        throughput: ThroughputOutputs | None = None
        if trials_planned and all(n in runs for n in _ARMS):
            ctx.progress("eval", 0.9, "throughput trials, FlagGems on and off")
            throughput = _throughput_trials(ctx, by_name, pool)
            for name in _ARMS:
                variants[name] = variants[name].model_copy(update={"throughput": _arm_mean(throughput, name)})
    ctx.progress("eval", 1.0, "done")
    failed = sorted(n for n, v in variants.items() if v.error)
    if ctx.options.get("role") == REFERENCE_ROLE and "reference" in runs:
        handed = publish_reference_run(cfg, runs["reference"].dir)
        variants["reference"] = variants["reference"].model_copy(update={"handed_over_to": str(handed)})
    rows = []
    for name, v in variants.items():
        for task in cfg.eval.tasks:
            t = v.tasks.get(task.name, {})
            rows.append(
                {
                    "variant": name,
                    "task": task.name,
                    "label": task.label or task.name,
                    "metric": t.get("metric"),
                    "score": t.get("score"),
                    "n_items": t.get("n_items"),
                    "samples_per_item": t.get("samples_per_item"),
                    "tokens_per_s": v.throughput,
                }
            )
    parts = [
        f"{n}: " + (", ".join(f"{k} {s:.2f}" for k, s in v.scores.items()) if not v.error else _failure(v))
        for n, v in variants.items()
    ]
    summary = "Evaluated " + "; ".join(parts) + "."
    if throughput is not None:
        on, off = (_arm_mean(throughput, n) for n in _ARMS)
        summary += f" Throughput trials ({len(throughput.trials)}): FlagGems on {on} / off {off} tokens/s."
    return StageResult(
        "eval",
        summary,
        outputs=EvalOutputs(variants=variants, throughput=throughput),
        tables={"eval": rows},
        status="warning" if failed else "ok",
    )


def _failure(v: VariantOutputs) -> str:
    return {"truncated": "failed the truncation probe", "unstable": "failed the stability probe"}.get(
        str(v.error_kind), "computed NaN/inf"
    )
