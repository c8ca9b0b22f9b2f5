"""The gate stage: statistical verdicts per benchmark and for throughput, FlagGems on vs off, bisection.

The bisection finds the FlagGems operators to blame when FlagGems changes the answers.

Modules: ``stats`` (every test and interval, on scipy and statsmodels), ``_report``
(rows, the report, its JSON and text), ``_compare`` (paired lm-eval logs; published
scores, unpaired; FlagRelease's relative rule), ``_throughput`` (the FlagGems on/off
throughput verdict), ``bisect`` (the operator search) and ``_stage`` (``run_stage``).
"""

from __future__ import annotations

from flagrelease.gate._compare import Rule, compare_benchmark, gate_dirs, gate_scores
from flagrelease.gate._report import BenchmarkSpec, GateReport, GateRow
from flagrelease.gate._stage import run_stage
from flagrelease.gate._throughput import throughput_verdict

__all__ = [
    "BenchmarkSpec",
    "GateReport",
    "GateRow",
    "Rule",
    "compare_benchmark",
    "gate_dirs",
    "gate_scores",
    "run_stage",
    "throughput_verdict",
]
