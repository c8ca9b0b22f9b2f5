"""``run_stage`` of the deploy stage (see :mod:`flagrelease.deploy`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flagrelease import render
from flagrelease._atomic import atomic_write_json
from flagrelease.config import RuntimeKind
from flagrelease.deploy.loadtest import run_load_test, smoke_test
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["run_stage"]

log = logging.getLogger("flagrelease.deploy")

#: The plugin rewrites its record once a second; wait this long before the last read.
_RECORD_SETTLE_S = 1.5


def _serve_files(ctx: ReleaseContext) -> list[Path]:
    # The FlagScale configs and the direct vLLM command; the Docker build context is the
    # image stage's (image.render_release also writes it, with wheels, into the bundle).
    return render.render_serve_configs(ctx.config, out_dir=ctx.layout.serve_dir)


def _image_ref(ctx: ReleaseContext) -> str | None:
    if ctx.config.runtime is not RuntimeKind.CONTAINER:
        return None
    return str(ctx.result("image").outputs.get("image_ref") or render.image_reference(ctx.config))


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
        outputs: ``serve_dir``, ``serve_files``, ``runtime``, ``python``, ``gems_ops``,
        ``gems_calls``, ``gems_library``, ``flag_gems_version``, ``load_test``, ``smoke``,
        ``logs``, ``endpoint``; tables: ``load_test``.

    Raises:
        DeployError: the engine could not be started, became unhealthy or failed every
            request of a load level.
    """
    cfg, layout = ctx.config, ctx.layout
    model_dir = Path(str(ctx.result("convert").outputs["model_dir"]))
    kind = cfg.runtime
    lt = cfg.serve.load_test
    if ctx.dry_run:
        argv = render.serve_command(cfg, model_path=str(model_dir), python="python")
        return StageResult(
            stage="deploy",
            summary=(
                f"dry run: would render the serve configs into `{layout.serve_dir}`, serve `{model_dir}` on the "
                f"{kind.value} runtime and load-test it at concurrency {lt.concurrency}"
            ),
            outputs={"serve_dir": str(layout.serve_dir), "runtime": kind.value, "command": argv},
            status="skipped",
        )
    from flagrelease.deploy import serving

    ctx.progress("deploy", 0.05, "rendering serve configs")
    files = _serve_files(ctx)
    python = _python(ctx)
    ctx.progress("deploy", 0.1, f"starting vLLM ({kind.value})")
    started = time.monotonic()
    with serving(
        cfg,
        model_dir=model_dir,
        log_dir=layout.logs_dir,
        variant="deploy",
        flaggems=cfg.serve.flaggems.enabled,
        image_ref=_image_ref(ctx),
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
        outputs={
            "serve_dir": str(layout.serve_dir),
            "serve_files": [str(p.relative_to(layout.serve_dir)) for p in files],
            "runtime": kind.value,
            "python": python,
            "gems_ops": sorted(ops),
            "gems_calls": ops,
            "gems_library": library,
            "flag_gems_version": version if library == "flag_gems" else None,
            "load_test": {"rows": rows, "startup_s": startup_s, "report": str(layout.reports_dir / "load_test.json")},
            "smoke": smoke,
            "logs": logs,
            "endpoint": base_url,
        },
        tables={"load_test": rows},
    )
