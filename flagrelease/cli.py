"""The ``flagrelease`` command line.

Each subcommand parses its arguments and calls one library function; heavy modules are
imported only by the subcommand that needs them, so ``flagrelease --help`` stays fast.
Commands that need Prefect (run, deploy, serve, demo) import it from ``flows/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from flagrelease import __version__
from flagrelease.errors import FlagReleaseError

__all__ = ["main"]

log = logging.getLogger("flagrelease")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from flagrelease._redact import install_log_redaction

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False, markup=False)],
    )
    install_log_redaction()
    for noisy in ("httpx", "httpcore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- validate ---------------------------------------------------------------------------
def _cmd_validate(args: argparse.Namespace) -> int:
    from flagrelease.config import validate_files

    paths = [Path(p) for p in args.paths]
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    bad = 0
    for path, err in validate_files(files).items():
        if err is None:
            print(f"ok    {path}")
            continue
        bad += 1
        if err.errors:
            for field, reason in err.errors:
                print(f"error {path}: {field}: {reason}")
        else:
            print(f"error {err.message}")
    print(f"{len(files) - bad} valid, {bad} invalid")
    return 1 if bad else 0


# -- plan -------------------------------------------------------------------------------
def _cmd_plan(args: argparse.Namespace) -> int:
    from flagrelease.plan import plan_release

    for path in args.configs:
        print(plan_release(Path(path)).to_text())
    return 0


# -- run / demo / deploy / serve (Prefect) ----------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    stages = args.stages.split(",") if args.stages else None
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
        from flows.release import run_release

        results = run_release(Path(args.config), stages=stages, dry_run=args.dry_run, force=args.force, options=options)
    for name, res in results.items():
        print(f"{name:8s} {res.status:8s} {res.summary}")
    failed = [r for r in results.values() if r.status == "failed"]
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.release import run_demo

    card = run_demo(use_prefect=not args.no_prefect, force=args.force)
    print(f"\nThe demo release is done. Model card: {card}")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployments import register_deployments

    for name in register_deployments(config_dir=Path(args.config_dir) if args.config_dir else None):
        print(f"registered flagrelease/{name}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(config_dir=Path(args.config_dir) if args.config_dir else None, limit=args.limit)
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
        Path(args.src), dst=Path(args.dst), to=args.to, workers=args.workers, device=args.device
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
    from flagrelease.gate import gate_dirs

    report = gate_dirs(Path(args.reference), target=Path(args.target), margin=args.margin, alpha=args.alpha)
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
    from flagrelease.gems.probe import probe_gems

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flagrelease``."""
    p = argparse.ArgumentParser(prog="flagrelease", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"flagrelease {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("validate", help="validate release configs (files or folders)")
    s.add_argument("paths", nargs="+")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("plan", help="show what a release would do, without doing it")
    s.add_argument("configs", nargs="+")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("run", help="run a release (the flagrelease flow) in this process")
    s.add_argument("config")
    s.add_argument("--stages", help="comma-separated stages (default: all)")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--force", action="store_true", help="ignore cached stage results")
    s.add_argument("--no-prefect", action="store_true", help="run the plain-Python pipeline")
    s.add_argument(
        "--role",
        choices=["reference"],
        help="run the release's reference side (a live reference on another chip) on this machine",
    )
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("demo", help="the embedded demo release on this CPU; prints the card's path")
    s.add_argument("--no-prefect", action="store_true")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("deploy", help="register one Prefect deployment per release config")
    s.add_argument("--config-dir")
    s.set_defaults(func=_cmd_deploy)

    s = sub.add_parser("serve", help="serve every release config's deployment from this process")
    s.add_argument("--config-dir")
    s.add_argument("--limit", type=int, default=None, help="max concurrent runs")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("fetch", help="download a release's weights and write the manifest")
    s.add_argument("config")
    s.add_argument("dest")
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=_cmd_fetch)

    s = sub.add_parser("convert", help="convert a checkpoint, streaming tensor by tensor")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", required=True, choices=["bf16", "int8-w8a8", "int8-w8a16", "int4-w4a16"])
    s.add_argument("--workers", type=int, default=0, help="threads (0: every core)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("render", help="write FlagScale configs, the vllm command and the Dockerfile")
    s.add_argument("config")
    s.add_argument("outdir")
    s.set_defaults(func=_cmd_render)

    s = sub.add_parser("gate", help="paired statistical consistency verdict between two lm-eval runs")
    s.add_argument("--reference", required=True, help="lm-eval --log_samples output of the reference")
    s.add_argument("--target", required=True, help="lm-eval --log_samples output of the target")
    s.add_argument("--margin", type=float, default=5.0, help="equivalence margin, percentage points")
    s.add_argument("--alpha", type=float, default=0.05)
    s.add_argument("--json", help="also write the report as JSON here")
    s.set_defaults(func=_cmd_gate)

    s = sub.add_parser("card", help="render the model card")
    s.add_argument("config")
    s.add_argument("--results", help="eval results JSON (default: rows render as TBD)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_card)

    s = sub.add_parser("publish", help="upload a built bundle (HF Hub, ModelScope, S3, registry)")
    s.add_argument("config")
    s.add_argument("--bundle", help="bundle folder (default: the release's)")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=_cmd_publish)

    s = sub.add_parser("probe-gems", help="per-operator FlagGems consistency probe (needs the chip)")
    s.add_argument("config")
    s.add_argument("--out")
    s.add_argument("--weights", help="checkpoint folder (default: random weights of the release's architecture)")
    s.add_argument("--model-config", help="config.json for random weights (default: the release's)")
    s.add_argument("--layers", type=int, help="keep this many decoder layers (default: 2 with random weights)")
    s.add_argument("--ops", help="comma-separated FlagGems operators (default: every one the model uses)")
    s.add_argument("--timeout", type=float, default=120, help="seconds per operator process")
    s.add_argument("--jobs", type=int, default=1, help="operator processes at once")
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("runtime", help="prepare the serving runtime for a chip (default: cpu)")
    s.add_argument("action", choices=["install"])
    s.add_argument("--chip", default="cpu")
    s.add_argument("--reinstall", action="store_true")
    s.set_defaults(func=_cmd_runtime)

    s = sub.add_parser("chips", help="list chip profiles")
    s.set_defaults(func=_cmd_chips)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except FlagReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
