"""The eval stage: lm-eval against the OpenAI-compatible endpoint of each variant (target, reference, FlagGems off), per-sample logs kept."""

from __future__ import annotations

from flagrelease.evaluate._eval import (
    Endpoint,
    EvalRun,
    VariantPlan,
    check_tasks,
    evaluate_endpoint,
    evaluate_live,
    load_stored_run,
    measure_throughput,
    plan_variants,
    run_stage,
    serve_variant,
)

__all__ = [
    "Endpoint",
    "EvalRun",
    "VariantPlan",
    "check_tasks",
    "evaluate_endpoint",
    "evaluate_live",
    "load_stored_run",
    "measure_throughput",
    "plan_variants",
    "run_stage",
    "serve_variant",
]
