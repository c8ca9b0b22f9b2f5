"""The probe's findings: tolerances, one result per operator, and the report.

:class:`ProbeReport` is what :func:`flagrelease.gems.probe.probe_gems` returns and writes
as ``gems_probe.json`` (:meth:`ProbeReport.to_json`) and ``gems_probe.md``
(:meth:`ProbeReport.to_text`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from flagrelease._redact import redact_obj

__all__ = ["FAILING", "OpResult", "ProbeReport", "Tolerances"]

#: Statuses that put an operator on the excluded list.
FAILING = ("mismatch", "nan", "crash", "error", "timeout")


@dataclass
class Tolerances:
    """When an operator's logits count as consistent with native.

    Derived from the model's own bf16 rounding noise (bf16 vs fp32 logits) when the
    fp32 model fits, else fixed defaults.
    """

    rel_l2: float = 0.05
    top1: float = 0.9
    source: str = "default"

    @classmethod
    def from_floor(cls, floor: dict[str, Any] | None, *, factor: float = 4.0) -> Tolerances:
        """``factor`` times the bf16-vs-fp32 relative L2 error; top-1 allows 3x its misses."""
        if not floor:
            return cls()
        rel = max(float(floor["rel_l2_err"]) * factor, 1e-3)
        top1 = max(0.5, 1.0 - 3.0 * (1.0 - float(floor["top1_agreement"])) - 0.01)
        return cls(rel_l2=round(rel, 6), top1=round(top1, 4), source="bf16-vs-fp32 noise floor")


@dataclass
class OpResult:
    """One operator, enabled alone."""

    op: str
    status: str
    calls: int | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    rel_l2_err: float | None = None
    top1_agreement: float | None = None
    nonfinite: int | None = None
    native_drift: float | None = None
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ProbeReport:
    """The probe's findings; ``excluded_ops`` goes into ``serve.flaggems.excluded_ops``."""

    release: str
    chip: str
    verdict: str
    reason: str = ""
    device: str | None = None
    device_name: str | None = None
    library: str = "flag_gems"
    library_version: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    tolerances: dict[str, Any] = field(default_factory=dict)
    ops: list[OpResult] = field(default_factory=list)
    full: list[dict[str, Any]] = field(default_factory=list)
    excluded_ops: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able data, secrets redacted."""
        return redact_obj(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeReport:
        """Rebuild a report saved by :meth:`to_json`."""
        data = dict(data)
        data["ops"] = [OpResult(**o) for o in data.get("ops", [])]
        return cls(**data)

    def to_text(self) -> str:
        """A Markdown summary with one row per operator and one per full run."""
        head = [
            f"# FlagGems probe: {self.release} on {self.chip}",
            "",
            f"verdict: **{self.verdict}**" + (f" ({self.reason})" if self.reason else ""),
        ]
        if self.device:
            head.append(
                f"device: {self.device_name or self.device}; {self.library} {self.library_version}; "
                + ", ".join(f"{k} {v}" for k, v in self.versions.items() if v)
            )
        if self.model:
            m = self.model
            arch = m.get("arch", {})
            head.append(
                f"model: {'random weights' if m.get('random_weights') else m.get('model_dir')}, "
                f"{arch.get('model_type')} hidden {arch.get('hidden_size')}, "
                f"{arch.get('num_hidden_layers')} layers, vocab {arch.get('vocab_size')}, "
                f"{m.get('params', 0) / 1e9:.2f}B params"
            )
        if self.tolerances:
            t = self.tolerances
            head.append(f"tolerance: rel L2 <= {t['rel_l2']:.2e}, top-1 >= {t['top1']:.3f} ({t['source']})")
        lines = [*head, ""]
        if self.ops:
            lines += [
                "| operator | status | calls | max abs err | max rel err | rel L2 err | top-1 | NaN/Inf | s |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in self.ops:
                lines.append(
                    f"| {r.op} | {r.status} | {_n(r.calls)} | {_e(r.max_abs_err)} | {_e(r.max_rel_err)} | "
                    f"{_e(r.rel_l2_err)} | {_f(r.top1_agreement)} | {_n(r.nonfinite)} | {r.seconds:.1f} |"
                )
            lines.append("")
        if self.full:
            lines += [
                "| run | status | rel L2 err | top-1 | prefill ms (native / gems) | decode tok/s "
                "(native / gems) | GPU kernel ms, profiled steps (native / gems) | Triton share of kernel time "
                "| of launches |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for run in self.full:
                lines.append(_full_row(run))
            lines.append("")
        for r in self.ops:
            if r.status in FAILING and r.detail:
                lines.append(f"- {r.op} ({r.status}): {r.detail.splitlines()[0][:300]}")
        for run in self.full:
            if run.get("status") != "ok" and run.get("detail"):
                lines.append(f"- full run ({run.get('status')}): {str(run['detail']).splitlines()[0][:300]}")
        lines.append(f"excluded_ops: {json.dumps(self.excluded_ops)}")
        return "\n".join(lines)


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _n(x: int | None) -> str:
    return "-" if x is None else str(x)


def _full_row(run: dict[str, Any]) -> str:
    label = "all operators" if not run.get("exclude") else f"all minus {len(run['exclude'])} excluded"
    if run.get("status") != "ok":
        return f"| {label} | {run.get('status')} | - | - | - | - | - | - | - |"
    m, nat, lib = run["metrics"], run["native"], run["library"]
    prof = lib.get("profile") or {}
    nprof = nat.get("profile") or {}
    kern = "-"
    if prof.get("kernel_time_us") is not None and nprof.get("kernel_time_us") is not None:
        kern = f"{nprof['kernel_time_us'] / 1e3:.2f} / {prof['kernel_time_us'] / 1e3:.2f}"
    share = prof.get("triton_time_share")
    launch = prof.get("triton_launch_share")
    return (
        f"| {label} | {run.get('verdict', 'ok')} | {_e(m['rel_l2_err'])} | {_f(m['top1_agreement'])} | "
        f"{nat['bench']['prefill_ms']:.2f} / {lib['bench']['prefill_ms']:.2f} | "
        f"{nat['bench']['decode_tok_s']:.0f} / {lib['bench']['decode_tok_s']:.0f} | {kern} | "
        f"{'-' if share is None else f'{share:.1%}'} | {'-' if launch is None else f'{launch:.1%}'} |"
    )
