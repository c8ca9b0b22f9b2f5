"""The probe as a pipeline step before eval: :func:`run_probe_step`.

It probes the weights the upstream stages left (converted BF16, else the fetched
source, else random weights of the release's architecture) and turns the report's
verdict into a step status.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from flagrelease.config import ConvertMode
from flagrelease.convert.outputs import ConvertOutputs
from flagrelease.errors import ConfigError
from flagrelease.fetch.outputs import FetchOutputs
from flagrelease.gems.probe import probe_gems
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["run_probe_step"]


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _step_weights(ctx: ReleaseContext) -> Path | None:
    """Weights transformers can load: converted BF16, else the fetched source, else none (random)."""
    sources: list[tuple[str, type[ConvertOutputs] | type[FetchOutputs]]] = [("fetch", FetchOutputs)]
    if ctx.config.convert.mode in (ConvertMode.NONE, ConvertMode.FP8_BLOCK_TO_BF16):
        sources.insert(0, ("convert", ConvertOutputs))
    for stage, kind in sources:
        try:
            model_dir = ctx.result(stage, kind).model_dir
        except ConfigError:  # that stage has not run for this release (or ran under another version)
            continue
        if model_dir and _has_weights(Path(model_dir)):
            return Path(model_dir)
    return None


def run_probe_step(ctx: ReleaseContext) -> StageResult:
    """The probe as a pipeline step before eval; writes ``reports/gems_probe.json``.

    Options read from ``ctx.options``: ``probe_timeout_s``, ``probe_jobs``, ``probe_layers``,
    ``probe_library`` and ``probe_bench`` (see :func:`probe_gems`).

    Returns:
        A ``probe`` result: status ``ok`` (pass), ``warning`` (excluded operators
        proposed in ``outputs['excluded_ops']``), ``failed`` or ``skipped``.
    """
    cfg = ctx.config
    if not cfg.serve.flaggems.enabled:
        return StageResult(
            stage="probe", summary="FlagGems is off for this release; nothing to probe.", status="skipped"
        )
    if ctx.dry_run:
        return StageResult(
            stage="probe",
            status="skipped",
            summary=f"would probe each FlagGems operator of {cfg.model.name} on {cfg.chip}",
            outputs={"report": str(ctx.layout.reports_dir / "gems_probe.json")},
        )
    ctx.progress("probe", 0.0, "probing FlagGems operators")
    report = probe_gems(
        cfg,
        out_dir=ctx.layout.reports_dir,
        weights=_step_weights(ctx),
        timeout_s=float(ctx.options.get("probe_timeout_s", 120)),
        jobs=int(ctx.options.get("probe_jobs", 1)),
        layers=ctx.options.get("probe_layers"),
        library=ctx.options.get("probe_library"),
        bench=ctx.options.get("probe_bench"),
    )
    ctx.progress("probe", 1.0, report.verdict)
    status = {"pass": "ok", "warning": "warning", "failed": "failed"}.get(report.verdict, "skipped")
    shipped = report.full[-1] if report.full else {}
    prof = (shipped.get("library") or {}).get("profile") or {}
    outputs = {
        "report": str(ctx.layout.reports_dir / "gems_probe.json"),
        "verdict": report.verdict,
        "excluded_ops": report.excluded_ops,
        "device": report.device_name,
        "flag_gems_version": report.library_version,
        "triton_time_share": prof.get("triton_time_share"),
        "speedup": shipped.get("speedup"),
    }
    rows = [{k: v for k, v in asdict(r).items() if k != "detail"} for r in report.ops]
    summary = f"FlagGems probe: {report.verdict}" + (f" ({report.reason})" if report.reason else "")
    return StageResult(stage="probe", summary=summary, outputs=outputs, tables={"gems_probe": rows}, status=status)
