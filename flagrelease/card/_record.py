"""What the deploy stage ran, made relative to the downloaded bundle (the manifest's ``serve.executed``).

The deploy stage records, per node, the server's command, its environment (secrets as
references), the image by digest and the mounts (:class:`ExecutedCommand`).  Those name
folders of the machine that ran them; here every path becomes one a downloader has:

- the weights folder becomes the bundle folder itself (``.``) when the bundle carries the
  weights, else its ``weights`` subfolder (where the card downloads them);
- a file inside the bundle becomes its path relative to the bundle;
- the deploy stage names the served weights ``weights/`` and the interpreter ``python``;
  absolute paths of the build machine that remain are mapped the same way;
- anything else of the build machine becomes a placeholder (:mod:`._scrub`).

Settings meaningless on the chip (``--gpu-memory-utilization`` on a CPU) are left out.
When the deploy stage ran but recorded nothing, the command is derived from the config
and marked as not run here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flagrelease import render
from flagrelease.card._scrub import BuildPaths
from flagrelease.config import ReleaseConfig
from flagrelease.deploy.outputs import DeployOutputs, ExecutedCommand

__all__ = ["MEANINGLESS_ARGS", "executed_commands", "model_mount"]

#: Engine arguments that mean nothing on a kind of accelerator (left out of the card).
MEANINGLESS_ARGS: dict[str, frozenset[str]] = {"cpu": frozenset({"gpu_memory_utilization"})}
#: How the deploy stage's record names the served weights folder.
_RECORD_WEIGHTS = "weights/"
#: Environment variables that only flagrelease's own recording reads.
_INTERNAL_ENV = frozenset({"FLAGRELEASE_GEMS_RECORD", "PYTHONPATH"})
_LOCAL_NODES = frozenset({"localhost", "127.0.0.1", "::1", ""})


def model_mount(cfg: ReleaseConfig) -> str:
    """Where the weights appear inside the container: ``serve.model_dir``, else ``/models/<model>``."""
    return cfg.serve.model_dir or f"/models/{render.model_slug(cfg)}"


def _drop_meaningless(cfg: ReleaseConfig, argv: list[str]) -> list[str]:
    names = MEANINGLESS_ARGS.get(cfg.chip_profile.accelerator.value, frozenset())
    flags = {"--" + n.replace("_", "-") for n in names}
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in flags:
            skip = True
            continue
        if word.split("=", 1)[0] in flags:
            continue
        out.append(word)
    return out


class _Mapper:
    """Maps one build-machine path to the downloader's: weights, bundle files, placeholders."""

    def __init__(self, *, weights: Iterable[Path], bundle_dir: Path, model_rel: str, paths: BuildPaths) -> None:
        self.weights = {str(p) for w in weights for p in (w, w.resolve())}
        self.bundle = bundle_dir.resolve()
        self.model_rel = model_rel
        self.paths = paths

    def path(self, value: str) -> str:
        if value == _RECORD_WEIGHTS.rstrip("/") or value.startswith(_RECORD_WEIGHTS):
            rest = value[len(_RECORD_WEIGHTS) :].strip("/") if value.startswith(_RECORD_WEIGHTS) else ""
            if not rest:
                return self.model_rel
            return rest if self.model_rel == "." else f"{self.model_rel}/{rest}"
        if not value.startswith("/"):
            return self.paths.text(value)
        stripped = value.rstrip("/")
        if stripped in self.weights:
            return self.model_rel
        for w in self.weights:
            if stripped.startswith(w + "/"):
                rest = stripped[len(w) + 1 :]
                return rest if self.model_rel == "." else f"{self.model_rel}/{rest}"
        try:
            return Path(stripped).resolve().relative_to(self.bundle).as_posix()
        except (ValueError, OSError):
            return self.paths.text(value)

    def word(self, value: str) -> str:
        key, eq, rest = value.partition("=")
        if eq and key.startswith("--") and rest.startswith("/"):
            return f"{key}={self.path(rest)}"
        return self.path(value)


def _relative(cmd: ExecutedCommand, cfg: ReleaseConfig, mapper: _Mapper, paths: BuildPaths) -> dict[str, Any]:
    argv = [mapper.word(w) for w in cmd.argv]
    if argv and cmd.argv[0].startswith(("/", "~")) and Path(cmd.argv[0]).name.startswith("python"):
        argv[0] = "python"
    env: dict[str, Any] = {}
    for name, value in cmd.env.items():
        if name in _INTERNAL_ENV:
            continue
        env[name] = {"secret": str(value.get("secret"))} if isinstance(value, dict) else mapper.word(str(value))
    mounts = []
    for m in cmd.mounts:
        source = mapper.path(str(m.get("source", "")))
        if source.startswith("<"):  # flagrelease's own recording folders, nothing a user needs
            continue
        mount = {"source": source, "target": str(m.get("target", ""))}
        if m.get("mode"):
            mount["mode"] = str(m["mode"])
        mounts.append(mount)
    node = paths.text(cmd.node)
    return {
        "node": "localhost" if node in _LOCAL_NODES or node == "<HOST>" else node,
        "argv": _drop_meaningless(cfg, argv),
        "env": env,
        "image": cmd.image,
        "mounts": mounts,
        "ran": cmd.ran,
        "reason": paths.text(cmd.reason) if cmd.reason else None,
        "source": "deploy",
        "runtime": cmd.runtime,
        "role": cmd.role,
        "step": cmd.step,
        "container": cmd.container,
        "docker_flags": list(cmd.docker_flags),
        "ports": list(cmd.ports),
    }


def executed_commands(
    cfg: ReleaseConfig,
    *,
    deploy: DeployOutputs | None,
    weights: Iterable[Path],
    bundle_dir: Path,
    model_rel: str,
    paths: BuildPaths,
) -> list[dict[str, Any]]:
    """The serving commands for the manifest, relative to the downloaded bundle.

    Args:
        cfg: the release config.
        deploy: what the deploy stage did; None when it has not run (nothing is recorded).
        weights: the folders the weights were served from on the build machine.
        bundle_dir: the bundle.
        model_rel: where the weights lie in the downloaded bundle (``.`` or ``weights``).
        paths: the build machine's folders, as placeholders.

    Returns:
        One entry per node: ``node``, ``argv``, ``env``, ``image``, ``mounts``, ``ran``,
        ``reason`` and ``source`` (``deploy`` for a record, ``config`` when derived).
    """
    if deploy is None:
        return []
    mapper = _Mapper(weights=weights, bundle_dir=bundle_dir, model_rel=model_rel, paths=paths)
    if deploy.executed:
        return [_relative(cmd, cfg, mapper, paths) for cmd in deploy.executed]
    argv = render.serve_command(cfg, model_path=model_rel, python="python")
    return [
        {
            "node": "localhost",
            "argv": _drop_meaningless(cfg, argv),
            "env": dict(render.serve_env(cfg)),
            "image": None,
            "mounts": [],
            "ran": False,
            "reason": "the deploy stage recorded no command; this one is derived from the release config",
            "source": "config",
            "runtime": "local",
            "role": "server",
            "step": "serve",
            "container": None,
            "docker_flags": [],
            "ports": [],
        }
    ]
