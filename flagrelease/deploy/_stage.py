"""``run_stage`` of the deploy stage (see :mod:`flagrelease.deploy`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flagrelease import render
from flagrelease._atomic import atomic_write_json
from flagrelease.config import RuntimeKind
from flagrelease.convert.outputs import ConvertOutputs
from flagrelease.deploy._record import local_record
from flagrelease.deploy.loadtest import run_load_test, smoke_test
from flagrelease.deploy.outputs import DeployOutputs, ExecutedCommand
from flagrelease.image.outputs import ImageOutputs
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["run_stage"]

log = logging.getLogger("flagrelease.deploy")

#: The plugin rewrites its record once a second; wait this long before the last read.
_RECORD_SETTLE_S = 1.5


def _serve_files(ctx: ReleaseContext) -> list[Path]:
    # The FlagScale configs and the direct vLLM command; the Docker build context is the
    # image stage's (image.render_release also writes it, with wheels, into the bundle).
    return render.render_serve_configs(ctx.config, out_dir=ctx.layout.serve_dir)


def _image(ctx: ReleaseContext) -> tuple[str | None, str | None]:
    """The image the container runtime runs, and its name by digest when it was pushed."""
    if ctx.config.runtime is not RuntimeKind.CONTAINER:
        return None, None
    image = ctx.result("image", ImageOutputs)
    ref = image.image_ref or str(render.image_reference(ctx.config))
    pinned = f"{ref.split('@', 1)[0]}@{image.digest}" if image.digest else ref
    return ref, pinned


def _planned(ctx: ReleaseContext, model_dir: Path, reason: str) -> list[ExecutedCommand]:
    """What the stage would run, recorded as not run."""
    from flagrelease.deploy import plan_serve

    cfg, kind = ctx.config, ctx.config.runtime
    plan = plan_serve(cfg, model_dir=model_dir, log_dir=ctx.layout.logs_dir, variant="deploy", check_model=False)
    if kind is RuntimeKind.CONTAINER:
        from flagrelease.deploy.container import container_record

        ref = str(render.image_reference(cfg))
        return [container_record(plan, image_ref=ref, ran=False, reason=reason)]
    if kind is RuntimeKind.MULTINODE:
        from flagrelease.deploy.multinode import multinode_record, plan_multinode

        return multinode_record(plan, plan_multinode(plan, secrets=False), ran=False, reason=reason)
    argv = render.serve_command(cfg, model_path=str(model_dir), python="python")
    return [local_record(argv, plan.env, model_dir=model_dir, python="python", ran=False, reason=reason)]


def _python(ctx: ReleaseContext) -> str | None:
    if ctx.config.runtime is not RuntimeKind.LOCAL:
        return None
    from flagrelease.runtime import serve_python

    return str(serve_python(ctx.config.chip))


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Render the serve configs, serve the converted model, smoke- and load-test it.

    Writes ``reports/load_test.json`` and ``reports/gems_ops.json`` and keeps the engine
    log in ``logs/``.

    Returns:
        :class:`~flagrelease.deploy.outputs.DeployOutputs` (``executed`` records what ran,
        for the card); tables: ``load_test``.

    Raises:
        DeployError: the engine could not be started, became unhealthy or failed every
            request of a load level.
    """
    cfg, layout = ctx.config, ctx.layout
    model_dir = Path(ctx.result("convert", ConvertOutputs).model_dir)
    kind = cfg.runtime
    lt = cfg.serve.load_test
    if ctx.dry_run:
        argv = render.serve_command(cfg, model_path=str(model_dir), python="python")
        planned = _planned(ctx, model_dir, "a dry run starts nothing")
        return StageResult(
            stage="deploy",
            summary=(
                f"dry run: would render the serve configs into `{layout.serve_dir}`, serve `{model_dir}` on the "
                f"{kind.value} runtime and load-test it at concurrency {lt.concurrency}"
            ),
            outputs=DeployOutputs(serve_dir=str(layout.serve_dir), runtime=kind.value, command=argv, executed=planned),
            status="skipped",
        )
    from flagrelease.deploy import serving

    ctx.progress("deploy", 0.05, "rendering serve configs")
    files = _serve_files(ctx)
    python = _python(ctx)
    image_ref, pinned = _image(ctx)
    ctx.progress("deploy", 0.1, f"starting vLLM ({kind.value})")
    started = time.monotonic()
    with serving(
        cfg,
        model_dir=model_dir,
        log_dir=layout.logs_dir,
        variant="deploy",
        flaggems=cfg.serve.flaggems.enabled,
        image_ref=image_ref,
    ) as endpoint:
        startup_s = round(time.monotonic() - started, 1)
        ctx.progress("deploy", 0.5, "smoke request")
        smoke = smoke_test(endpoint.base_url, model_name=endpoint.model_name, prompt=lt.prompt)
        ctx.progress("deploy", 0.6, f"load test at concurrency {lt.concurrency}")
        rows = run_load_test(endpoint.base_url, model_name=endpoint.model_name, settings=lt)
        plugin = endpoint.plugin_processes()
        if endpoint.flaggems:
            time.sleep(_RECORD_SETTLE_S)
        ops = endpoint.gems_ops()
        base_url = endpoint.base_url
        executed = [c.model_copy(update={"image": pinned}) if c.image else c for c in endpoint.info.get("executed", [])]
    ctx.progress("deploy", 0.95, "writing reports")
    modes = {p.get("mode") for p in plugin}
    version = next((p.get("version") for p in plugin if p.get("version")), None)
    library = "flag_gems" if "flag_gems" in modes else "flagrelease-oplib" if "oplib" in modes else None
    gems_report: dict[str, Any] = {
        "enabled": cfg.serve.flaggems.enabled,
        "library": library,
        "version": version,
        "excluded_ops": list(cfg.serve.flaggems.excluded_ops),
        "operators": sorted(ops),
        "calls": ops,
        "processes": plugin,
    }
    atomic_write_json(layout.reports_dir / "gems_ops.json", gems_report)
    load_test = {
        "settings": lt.model_dump(mode="json"),
        "rows": rows,
        "startup_s": startup_s,
        "flaggems": cfg.serve.flaggems.enabled,
        "runtime": kind.value,
    }
    atomic_write_json(layout.reports_dir / "load_test.json", load_test)
    logs = sorted(str(p) for p in layout.logs_dir.glob("*") if p.is_file() and "deploy" in p.name)
    best = max(rows, key=lambda r: r["output_tokens_per_s"])
    summary = (
        f"Served `{endpoint.model_name}` on the {kind.value} runtime (ready in {startup_s:.0f}s); "
        f"up to {best['output_tokens_per_s']:.1f} output tokens/s at concurrency {best['concurrency']}"
        + (f"; {len(ops)} FlagGems operators ran ({library})" if cfg.serve.flaggems.enabled else "; FlagGems off")
        + "."
    )
    return StageResult(
        stage="deploy",
        summary=summary,
        outputs=DeployOutputs(
            serve_dir=str(layout.serve_dir),
            serve_files=[str(p.relative_to(layout.serve_dir)) for p in files],
            runtime=kind.value,
            python=python,
            gems_ops=sorted(ops),
            gems_calls=ops,
            gems_library=library,
            flag_gems_version=version if library == "flag_gems" else None,
            load_test={"rows": rows, "startup_s": startup_s, "report": str(layout.reports_dir / "load_test.json")},
            smoke=smoke,
            logs=logs,
            endpoint=base_url,
            executed=executed,
        ),
        tables={"load_test": rows},
    )
