"""The handlers of the ``flagrelease`` subcommands (the parser is :mod:`flagrelease.cli`).

Each handler takes the parsed arguments and calls one library function; heavy modules
are imported inside the handler that needs them, so ``flagrelease --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
from contextlib import AbstractContextManager
from pathlib import Path

__all__ = [
    "_cmd_card",
    "_cmd_chips",
    "_cmd_convert",
    "_cmd_demo",
    "_cmd_deploy",
    "_cmd_fetch",
    "_cmd_gate",
    "_cmd_plan",
    "_cmd_probe",
    "_cmd_publish",
    "_cmd_render",
    "_cmd_run",
    "_cmd_runtime",
    "_cmd_serve",
    "_cmd_services",
    "_cmd_validate",
]

log = logging.getLogger("flagrelease")


# -- validate ---------------------------------------------------------------------------
def _cmd_validate(args: argparse.Namespace) -> int:
    from flagrelease.config import validate_files
    from flagrelease.errors import ConfigError
    from flagrelease.matrix import is_matrix_file, matrix_files, validate_matrix

    paths = [Path(p) for p in args.paths]
    files: list[Path] = []
    for p in paths:
        # A folder of release configs holds its matrices in matrices/.
        files.extend(sorted(p.glob("*.yaml")) + matrix_files(p) if p.is_dir() else [p])
    matrices = [f for f in files if f.is_file() and is_matrix_file(f)]
    results: dict[str, ConfigError | None] = {
        str(path): err for path, err in validate_files([f for f in files if f not in matrices]).items()
    }
    for m in matrices:  # the matrix itself, then each of its pairs (<file>#<chip>)
        results.update(validate_matrix(m))
    bad = 0
    for path, err in results.items():
        if err is None:
            print(f"ok    {path}")
            continue
        bad += 1
        if err.errors:
            for field, reason in err.errors:
                print(f"error {path}: {field}: {reason}")
        else:
            print(f"error {err.message}")
    print(f"{len(results) - bad} valid, {bad} invalid")
    return 1 if bad else 0


# -- plan -------------------------------------------------------------------------------
def _cmd_plan(args: argparse.Namespace) -> int:
    from flagrelease.plan import plan_release

    for path in args.configs:
        print(plan_release(Path(path)).to_text())
    return 0


# -- run / demo / deploy / serve (Prefect) ----------------------------------------------
_STAGE_SYNONYMS = {
    "download": "fetch",
    "quantize": "convert",
    "quantise": "convert",
    "quant": "convert",
    "build": "image",
    "docker": "image",
    "serve": "deploy",
    "evaluate": "eval",
    "evaluation": "eval",
    "test": "eval",
    "upload": "publish",
}


def _checked_stages(text: str | None) -> list[str] | None:
    """The ``--stages`` list, every name checked, before anything starts."""
    import difflib

    from flagrelease.errors import ConfigError
    from flagrelease.pipeline import STAGES

    if text is None:
        return None
    stages = [s.strip() for s in text.split(",")]
    for stage in stages:
        if stage not in STAGES:
            guess = _STAGE_SYNONYMS.get(stage.lower()) or next(
                iter(difflib.get_close_matches(stage.lower(), STAGES, n=1, cutoff=0.6)), None
            )
            hint = f"did you mean {guess}? " if guess else ""
            raise ConfigError(
                f"--stages: unknown stage {stage!r}; {hint}the stages are, in order: {', '.join(STAGES)}",
                errors=[("--stages", f"unknown stage {stage!r}")],
            )
    return stages


def _cmd_run(args: argparse.Namespace) -> int:
    # Everything a run is given is checked here, before Prefect (or anything else) starts.
    from flagrelease.config import load_release

    stages = _checked_stages(args.stages)
    load_release(args.config)
    options = {"role": args.role} if args.role else {}
    if args.role and stages is None:
        from flagrelease.config import load_release
        from flagrelease.roles import reference_stages

        stages = reference_stages(load_release(args.config))
    if args.no_prefect:
        from flagrelease.config import load_release
        from flagrelease.pipeline import ReleaseContext, run_pipeline

        cfg = load_release(args.config)
        ctx = ReleaseContext.create(cfg, config_path=Path(args.config).resolve(), dry_run=args.dry_run, **options)
        results = run_pipeline(ctx, stages=stages, force=args.force)
    else:
        from flows._server import prefect_api
        from flows.release import resolve_config, run_release

        with _release_lock(resolve_config(args.config), role=args.role, dry_run=args.dry_run), prefect_api():
            results = run_release(
                Path(args.config), stages=stages, dry_run=args.dry_run, force=args.force, options=options
            )
    # Each summary was logged once as its stage ended; the recap is one line per stage.
    for name, res in results.items():
        print(f"{name:8s} {res.status:8s} {max(res.finished_at - res.started_at, 0.0):8.1f}s")
    failed = [r for r in results.values() if r.status == "failed"]
    return 1 if failed else 0


def _release_lock(config: Path, *, role: str | None = None, dry_run: bool = False) -> AbstractContextManager[None]:
    """One run per release, checked before Prefect starts: a second run refuses at once, naming the first."""
    from flagrelease._lease import release_lock
    from flagrelease.config import load_release
    from flagrelease.layout import BundleLayout
    from flagrelease.roles import release_for_role

    if dry_run:
        return contextlib.nullcontext()
    cfg = release_for_role(load_release(config), role)
    return release_lock(BundleLayout.for_release(cfg).root, release=cfg.name)


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows._server import prefect_api
    from flows.release import DEMO_CONFIG, resolve_config, run_demo

    with _release_lock(resolve_config(DEMO_CONFIG)), contextlib.nullcontext() if args.no_prefect else prefect_api():
        card = run_demo(use_prefect=not args.no_prefect, force=args.force)
    print(f"\nThe demo release is done. Model card: {card}")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployments import register_deployments

    for name in register_deployments(config_dir=Path(args.config_dir) if args.config_dir else None):
        print(f"registered {name}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    given = serve_deployments(
        config_dir=Path(args.config_dir) if args.config_dir else None, limit=args.limit, take_over=args.take_over
    )
    for name in given:
        print(f"gave {name} back to its work pool")
    return 0


# -- stage commands ---------------------------------------------------------------------
def _cmd_fetch(args: argparse.Namespace) -> int:
    from flagrelease.config import load_release
    from flagrelease.fetch import fetch_model

    cfg = load_release(args.config)
    result = fetch_model(cfg.model, dest=Path(args.dest), workers=args.workers, dry_run=args.dry_run)
    print(json.dumps(result.to_json(), indent=2))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from flagrelease.convert import convert_checkpoint

    report = convert_checkpoint(
        Path(args.src),
        dst=Path(args.dst),
        to=args.to,
        workers=args.workers,
        device=args.device,
        allow_non_finite=args.allow_non_finite,
    )
    print(report.to_text())
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from flagrelease.config import load_release
    from flagrelease.image import render_release

    cfg = load_release(args.config)
    files = render_release(cfg, out_dir=Path(args.outdir))
    for path in files:
        print(path)
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from flagrelease.errors import GateError
    from flagrelease.gate import Rule, gate_dirs, gate_scores
    from flagrelease.samples import SamplesError, load_reference_scores

    rule = Rule(args.rule, args.relative_margin)
    if args.reference_scores:
        try:
            scores = load_reference_scores(Path(args.reference_scores))
        except SamplesError as err:
            raise GateError(str(err)) from err
        report = gate_scores(scores, target=Path(args.target), margin=args.margin, alpha=args.alpha, rule=rule)
    else:
        report = gate_dirs(
            Path(args.reference), target=Path(args.target), margin=args.margin, alpha=args.alpha, rule=rule
        )
    print(report.to_text())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.verdict != "inconsistent" else 1


def _cmd_card(args: argparse.Namespace) -> int:
    from flagrelease.card import render_card_cli

    out = render_card_cli(
        Path(args.config), results=Path(args.results) if args.results else None, out_dir=Path(args.out)
    )
    print(out)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from flagrelease.config import load_release
    from flagrelease.layout import BundleLayout
    from flagrelease.publish import publish_bundle

    cfg = load_release(args.config)
    bundle = Path(args.bundle) if args.bundle else BundleLayout.for_release(cfg).bundle_dir
    plan = publish_bundle(cfg, bundle_dir=bundle, dry_run=args.dry_run)
    print(plan.to_text())
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from flagrelease.config import load_release
    from flagrelease.gems import probe_gems

    cfg = load_release(args.config)
    report = probe_gems(
        cfg,
        out_dir=Path(args.out) if args.out else None,
        weights=Path(args.weights) if args.weights else None,
        ops=args.ops.split(",") if args.ops else None,
        timeout_s=args.timeout,
        model_config=Path(args.model_config) if args.model_config else None,
        layers=args.layers,
        jobs=args.jobs,
    )
    print(report.to_text())
    return 1 if report.verdict == "failed" else 0


def _cmd_runtime(args: argparse.Namespace) -> int:
    if args.action == "record-args":
        from flagrelease.config import record_vllm_args
        from flagrelease.runtime import serve_python

        python = Path(args.python) if args.python else serve_python(args.chip, install=False)
        print(record_vllm_args(python, out_dir=Path(args.out)) if args.out else record_vllm_args(python))
        return 0
    from flagrelease.runtime import ensure_runtime

    python = ensure_runtime(args.chip, reinstall=args.reinstall)
    print(python)
    return 0


def _cmd_chips(args: argparse.Namespace) -> int:
    from flagrelease.chips import list_chips, load_chip

    for name in list_chips():
        chip = load_chip(name)
        print(f"{name:18s} {chip.vendor:10s} {chip.device_type:11s} gems={chip.gems_vendor:10s} pool={chip.work_pool}")
    return 0


def _cmd_services(args: argparse.Namespace) -> int:
    from flagrelease.services import ensure_engine, ensure_registry

    engine = ensure_engine(hold=True)
    registry = ensure_registry(args.registry, hold=True)
    own = " (started by flagrelease)"
    print(f"Docker engine {engine.base_url}{own if engine.managed else ''}")
    print(f"              use it: export DOCKER_HOST={engine.base_url}")
    print(f"registry      {registry.url}{own if registry.managed else ''}")
    print("Running until Ctrl-C; what flagrelease started stops once no flagrelease process uses it.", flush=True)
    signal.pause()
    return 0
