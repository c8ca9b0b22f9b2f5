"""The publish stage: the card stage's bundle (and the converted weights) to every destination."""

from __future__ import annotations

from pathlib import Path

from flagrelease._redact import redact
from flagrelease.bundle import gate_failure_reasons
from flagrelease.card.outputs import CardOutputs
from flagrelease.errors import ConfigError
from flagrelease.gate.outputs import GateOutputs
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.publish._plan import PublishPlan
from flagrelease.publish._publish import publish_bundle
from flagrelease.publish.outputs import PublishOutputs

__all__ = ["run_stage"]


def _bundle_dir(ctx: ReleaseContext) -> Path:
    """The folder the card stage wrote the manifest into (the layout's bundle before it ran)."""
    try:
        return Path(ctx.result("card", CardOutputs).manifest).parent
    except ConfigError:
        return ctx.layout.bundle_dir


def run_stage(ctx: ReleaseContext) -> StageResult:
    """The publish stage: publish ``bundle/`` (and converted weights) to every configured destination.

    The gate's verdict is read from ``ctx.result("gate", GateOutputs)`` (without a gate
    result, the manifest's); tokens from ``ctx.options["publish_credentials"]`` (resolved
    Prefect Secret blocks) or the environment.

    Returns:
        A result whose outputs are :class:`~flagrelease.publish.outputs.PublishOutputs`;
        status ``warning`` when a failed or unverified release was published by an opt-in,
        or a destination needs a person (a ModelScope repo to make public).

    Raises:
        PublishBlockedError: the gate refuses.
        PublishError: the bundle does not match its manifest, or a destination failed.
    """
    cfg = ctx.config
    gate_failed: bool | None = None
    gate_verdict: str | None = None
    try:
        gate_out = ctx.result("gate", GateOutputs)
        gate_failed = bool(gate_failure_reasons(None, stage=ctx.result("gate"))) or None
        gate_verdict = gate_out.verdict
    except ConfigError:
        pass  # no gate result: the manifest's verdict decides
    pub = cfg.publish
    if not any((pub.local_dir, pub.hf_repo, pub.modelscope_repo, pub.s3, pub.registry)):
        return StageResult(
            stage="publish", summary="no publish destination configured", status="skipped", outputs=PublishOutputs()
        )
    ctx.progress("publish", 0.05, "checking the bundle against its manifest")

    def on_part(path: str, number: int, total: int) -> None:
        ctx.progress("publish", 0.1 + 0.7 * number / max(total, 1), f"s3: {path} part {number}/{total}")

    def on_staged(_: object) -> None:
        ctx.progress("publish", 0.85, "staged and verified everywhere; making it public")

    out = publish_bundle(
        cfg,
        bundle_dir=_bundle_dir(ctx),
        dry_run=ctx.dry_run,
        credentials=ctx.options.get("publish_credentials"),
        gate_failed=gate_failed,
        gate_verdict=gate_verdict,
        on_s3_part=on_part,
        on_staged=on_staged,
    )
    if isinstance(out, PublishPlan):
        return StageResult(
            stage="publish",
            summary=out.to_text().splitlines()[0],
            outputs=PublishOutputs.model_validate(out.to_outputs()),
            status="skipped",
        )
    rows = [
        {"destination": d.name, "path": p, "action": action}
        for d in out.destinations
        for action, paths in (("uploaded", d.uploaded), ("unchanged", d.skipped))
        for p in paths
    ]
    parts = [
        f"{d.name}: {len(d.uploaded)} uploaded, {len(d.skipped)} unchanged, {len(d.verified)} verified"
        + ("" if d.promoted else ", not public")
        for d in out.destinations
    ]
    summary = f"published {out.bundle_name} ({'; '.join(parts)})"
    if out.gate_failed:
        summary += " -- the release FAILED its gate (publish_on_fail)"
    if out.gate_unverified:
        summary += f" -- the gate verdict is {out.gate_unverified.upper()} (publish.allow_verdicts)"
    ctx.progress("publish", 1.0, "published")
    return StageResult(
        stage="publish",
        summary=redact(summary),
        outputs=PublishOutputs.model_validate(out.to_outputs()),
        tables={"files": rows},
        status="warning" if out.warnings else "ok",
    )
