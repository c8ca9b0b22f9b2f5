"""The ``flagrelease`` command line.

Each subcommand parses its arguments and calls one library function; heavy modules are
imported only by the subcommand that needs them, so ``flagrelease --help`` stays fast.
Commands that need Prefect (run, deploy, serve, demo) import it from ``flows/``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
from collections.abc import Sequence
from types import FrameType

from flagrelease import __version__
from flagrelease._commands import (
    _cmd_card,
    _cmd_chips,
    _cmd_convert,
    _cmd_demo,
    _cmd_deploy,
    _cmd_fetch,
    _cmd_gate,
    _cmd_plan,
    _cmd_probe,
    _cmd_publish,
    _cmd_render,
    _cmd_run,
    _cmd_runtime,
    _cmd_serve,
    _cmd_services,
    _cmd_validate,
)
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


_DESCRIPTION = (
    "Release a large language model onto an AI chip: fetch the weights, convert them, build the "
    "serving image, deploy it, evaluate it against a reference, gate the result, write the model card "
    "and publish the bundle."
)

_START_HERE = """\
start here:
  flagrelease demo          the demo release: a tiny model, end to end, on this CPU
  flagrelease run CONFIG    a release of your own (check it first: flagrelease validate CONFIG)
"""

_EPILOG = "Each command has its own help: flagrelease COMMAND --help."


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name``; its one-line summary is also its description."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flagrelease``."""
    from flagrelease.pipeline import STAGES

    p = argparse.ArgumentParser(
        prog="flagrelease",
        description=f"{textwrap.fill(_DESCRIPTION, width=88)}\n\n{_START_HERE}",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"flagrelease {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    config_help = "the release config (a YAML file, e.g. release_configs/demo-tiny-cpu.yaml)"

    # -- the two a newcomer needs -----------------------------------------------------------
    s = _command(sub, "demo", "release the built-in tiny model end to end on this CPU; prints the card's path")
    s.add_argument("--no-prefect", action="store_true", help="run the plain-Python pipeline, without Prefect")
    s.add_argument("--force", action="store_true", help="run every stage again, ignoring cached results")
    s.set_defaults(func=_cmd_demo)

    s = _command(sub, "run", "run a release (the flagrelease flow) in this process")
    s.add_argument("config", help=config_help)
    s.add_argument(
        "--stages",
        metavar="STAGE[,STAGE...]",
        help=f"comma-separated stages to run, in pipeline order: {', '.join(STAGES)} (default: all)",
    )
    s.add_argument("--dry-run", action="store_true", help="plan every stage without side effects")
    s.add_argument("--force", action="store_true", help="ignore cached stage results and run the stages again")
    s.add_argument("--no-prefect", action="store_true", help="run the plain-Python pipeline, without Prefect")
    s.add_argument(
        "--role",
        choices=["reference"],
        help="run the release's reference side (a live reference on another chip) on this machine",
    )
    s.set_defaults(func=_cmd_run)

    s = _command(sub, "validate", "validate release configs (files or folders)")
    s.add_argument("paths", nargs="+", metavar="PATH", help="a release config, or a folder of them (*.yaml)")
    s.set_defaults(func=_cmd_validate)

    s = _command(sub, "plan", "show what a release would do, without doing it")
    s.add_argument("configs", nargs="+", metavar="CONFIG", help="release configs (YAML files)")
    s.set_defaults(func=_cmd_plan)

    # -- one stage at a time ----------------------------------------------------------------
    s = _command(sub, "fetch", "download a release's weights and write the manifest")
    s.add_argument("config", help=config_help)
    s.add_argument("dest", help="the folder to download into (created if missing)")
    s.add_argument("--workers", type=int, default=8, help="files transferred in parallel (default: 8)")
    s.add_argument("--dry-run", action="store_true", help="list the files and sizes; download nothing")
    s.set_defaults(func=_cmd_fetch)

    s = _command(sub, "convert", "convert a checkpoint, streaming tensor by tensor")
    s.add_argument("src", help="the checkpoint folder (safetensors and config.json)")
    s.add_argument("dst", help="the folder to write the converted checkpoint into")
    s.add_argument(
        "--to",
        required=True,
        choices=["bf16", "int8-w8a8", "int8-w8a16", "int4-w4a16"],
        help="the target format",
    )
    s.add_argument("--workers", type=int, default=0, help="threads (0: every core)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert tensors holding NaN or Inf (by default such a tensor stops the conversion, named)",
    )
    s.set_defaults(func=_cmd_convert)

    s = _command(sub, "render", "write FlagScale configs, the vllm command and the Dockerfile")
    s.add_argument("config", help=config_help)
    s.add_argument("outdir", help="the folder to write the files into")
    s.set_defaults(func=_cmd_render)

    s = _command(sub, "gate", "statistical consistency verdict: two lm-eval runs, or a run and published scores")
    ref = s.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", help="lm-eval --log_samples output of the reference")
    ref.add_argument(
        "--reference-scores",
        metavar="YAML",
        help="published reference scores instead (task -> score in percent, n where known): an unpaired test",
    )
    s.add_argument("--target", required=True, help="lm-eval --log_samples output of the target")
    s.add_argument("--margin", type=float, default=5.0, help="equivalence margin, percentage points (default: 5)")
    s.add_argument("--alpha", type=float, default=0.05, help="level of each one-sided test (default: 0.05)")
    s.add_argument(
        "--rule",
        choices=["absolute", "relative"],
        default="absolute",
        help="absolute: TOST against --margin (default); relative: FlagRelease's drop of at most --relative-margin",
    )
    s.add_argument(
        "--relative-margin", type=float, default=5.0, help="relative rule: largest drop, percent of the reference"
    )
    s.add_argument("--json", help="also write the report as JSON here")
    s.set_defaults(func=_cmd_gate)

    s = _command(sub, "card", "render the model card")
    s.add_argument("config", help=config_help)
    s.add_argument("--results", help="gate results JSON (default: rows render as TBD)")
    s.add_argument("--out", required=True, help="the folder to write README.md (the card) and serve/ into")
    s.set_defaults(func=_cmd_card)

    s = _command(sub, "publish", "upload a built bundle (HF Hub, ModelScope, S3, registry)")
    s.add_argument("config", help=config_help)
    s.add_argument("--bundle", help="bundle folder (default: the release's)")
    s.add_argument("--dry-run", action="store_true", help="show what would be uploaded, and where; upload nothing")
    s.set_defaults(func=_cmd_publish)

    s = _command(sub, "probe-gems", "per-operator FlagGems consistency probe (needs the chip)")
    s.add_argument("config", help=config_help)
    s.add_argument("--out", help="folder for gems_probe.json and gems_probe.md (default: the bundle's reports folder)")
    s.add_argument("--weights", help="checkpoint folder (default: random weights of the release's architecture)")
    s.add_argument("--model-config", help="config.json for random weights (default: the release's)")
    s.add_argument("--layers", type=int, help="keep this many decoder layers (default: 2 with random weights)")
    s.add_argument("--ops", help="comma-separated FlagGems operators (default: every one the model uses)")
    s.add_argument("--timeout", type=float, default=120, help="seconds per operator process (default: 120)")
    s.add_argument("--jobs", type=int, default=1, help="operator processes at once (default: 1)")
    s.set_defaults(func=_cmd_probe)

    # -- Prefect deployments ----------------------------------------------------------------
    configs_help = "folder of release configs (default: release_configs/)"
    s = _command(sub, "deploy", "register one Prefect deployment per release config")
    s.add_argument("--config-dir", help=configs_help)
    s.set_defaults(func=_cmd_deploy)

    s = _command(sub, "serve", "serve every release config's deployment from this process")
    s.add_argument("--config-dir", help=configs_help)
    s.add_argument("--limit", type=int, default=None, help="max concurrent runs (default: no limit)")
    s.add_argument(
        "--take-over",
        action="store_true",
        help="also serve other chips' work-pool deployments here (each is given back when serving stops)",
    )
    s.set_defaults(func=_cmd_serve)

    # -- this machine -----------------------------------------------------------------------
    s = _command(sub, "runtime", "prepare the serving runtime for a chip (default: cpu)")
    s.add_argument(
        "action",
        choices=["install", "record-args"],
        help="install: create the serving venv unless a complete one exists; record-args: record the engine "
        "arguments of a vLLM (--python) in flagrelease/data/vllm_args/<version>.json, which validate checks "
        "engine_args against",
    )
    s.add_argument("--python", help="record-args: an interpreter with vLLM (default: the chip's serving runtime)")
    s.add_argument("--out", help="record-args: the folder to write into (default: flagrelease/data/vllm_args)")
    s.add_argument("--chip", default="cpu", help="the chip profile (default: cpu, the only one with a local runtime)")
    s.add_argument("--reinstall", action="store_true", help="remove and recreate the venv even if it is complete")
    s.set_defaults(func=_cmd_runtime)

    s = _command(sub, "services", "run the Docker engine and the local registry the demo pushes to, until Ctrl-C")
    s.add_argument("--registry", default="127.0.0.1:5000", help="the loopback registry (default: 127.0.0.1:5000)")
    s.set_defaults(func=_cmd_services)

    s = _command(sub, "chips", "list chip profiles")
    s.set_defaults(func=_cmd_chips)
    return p


#: Seconds a run may take to wind down after SIGTERM before it exits regardless.
_SIGTERM_DEADLINE_S = 8.0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Stop the servers this run started, then unwind like Ctrl-C; exit for sure within the deadline."""
    import os
    import threading

    from flagrelease._supervise import stop_all

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the teardown it starts is bounded; let it finish
    watchdog = threading.Timer(_SIGTERM_DEADLINE_S, os._exit, args=(128 + signum,))
    watchdog.daemon = True
    watchdog.start()
    stop_all(grace_s=3.0)  # servers of other threads too: whatever waits on them fails fast
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in ("run", "demo"):
        # SIGTERM unwinds like Ctrl-C, so servers are stopped and locks released on the way out.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
