"""The gate stage: paired statistical verdicts per benchmark, the throughput gate, FlagGems on vs off, and bisection to the operators to blame."""

from __future__ import annotations

from flagrelease.gate._gate import (
    BenchmarkSpec,
    GateReport,
    GateRow,
    compare_benchmark,
    gate_dirs,
    run_stage,
)

__all__ = [
    "BenchmarkSpec",
    "GateReport",
    "GateRow",
    "compare_benchmark",
    "gate_dirs",
    "run_stage",
]
