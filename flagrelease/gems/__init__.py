"""Everything about FlagGems: the operator probe, the CPU operators, the vLLM plugin, the GPU kernels.

The package's public API is below; its names load on first use, because the vLLM
plugin (:mod:`flagrelease.gems.vllm_plugin`) runs inside the serving venv, where importing
this package must stay free of the orchestrator's dependencies.

- The probe (``flagrelease probe-gems``): :func:`probe_gems` and its report
  (:class:`ProbeReport`, :class:`OpResult`, :class:`Tolerances`), :func:`run_probe_step`
  (the probe as a step before eval), :func:`run_isolated` (one time-limited process),
  :func:`kernel_stats` (Triton's share of a profile).
- Submodules: :mod:`~flagrelease.gems.oplib` (the CPU reference operators),
  :mod:`~flagrelease.gems.vllm_plugin` (the serving plugin) and
  :mod:`~flagrelease.gems.gpu_kernels` (the conversion kernels on a GPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flagrelease.gems._isolated import IsolatedRun, run_isolated
    from flagrelease.gems._probe_kernels import kernel_stats, looks_like_triton_kernel
    from flagrelease.gems._probe_report import OpResult, ProbeReport, Tolerances
    from flagrelease.gems._probe_step import run_probe_step
    from flagrelease.gems.probe import TINY_QWEN2_CONFIG, probe_gems

__all__ = [
    "TINY_QWEN2_CONFIG",
    "IsolatedRun",
    "OpResult",
    "ProbeReport",
    "Tolerances",
    "kernel_stats",
    "looks_like_triton_kernel",
    "probe_gems",
    "run_isolated",
    "run_probe_step",
]

_HOMES = {
    "TINY_QWEN2_CONFIG": "flagrelease.gems.probe",
    "IsolatedRun": "flagrelease.gems._isolated",
    "OpResult": "flagrelease.gems._probe_report",
    "ProbeReport": "flagrelease.gems._probe_report",
    "Tolerances": "flagrelease.gems._probe_report",
    "kernel_stats": "flagrelease.gems._probe_kernels",
    "looks_like_triton_kernel": "flagrelease.gems._probe_kernels",
    "probe_gems": "flagrelease.gems.probe",
    "run_isolated": "flagrelease.gems._isolated",
    "run_probe_step": "flagrelease.gems._probe_step",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
