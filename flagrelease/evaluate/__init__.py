"""The eval stage: lm-eval against each variant's OpenAI-compatible endpoint, per-sample logs kept.

Variants: the target, the reference and FlagGems off (see :mod:`flagrelease.evaluate._variants`).

Modules: ``_tasks`` (task names), ``_run`` (lm-eval against one endpoint; stored runs),
``_lmeval_runner`` (the child process that drives lm-eval), ``_probes`` (the stability
and truncation probes), ``_variants`` (the variants of a release; serving and
evaluating one), ``_throughput`` (the interleaved FlagGems on/off trials), ``_stage``
(``run_stage``) and ``reference`` (a live reference on another chip).
"""

from __future__ import annotations

from flagrelease.evaluate._probes import stability_probe
from flagrelease.evaluate._run import Endpoint, EvalRun, evaluate_endpoint, load_stored_run
from flagrelease.evaluate._stage import run_stage
from flagrelease.evaluate._tasks import check_tasks
from flagrelease.evaluate._throughput import Arm, measure_interleaved, measure_throughput
from flagrelease.evaluate._variants import (
    ServerPool,
    VariantPlan,
    evaluate_live,
    flaggems_trial,
    plan_variants,
    serve_variant,
)

__all__ = [
    "Arm",
    "Endpoint",
    "EvalRun",
    "ServerPool",
    "VariantPlan",
    "check_tasks",
    "evaluate_endpoint",
    "evaluate_live",
    "flaggems_trial",
    "load_stored_run",
    "measure_interleaved",
    "measure_throughput",
    "plan_variants",
    "run_stage",
    "serve_variant",
    "stability_probe",
]
