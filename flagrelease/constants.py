"""Every environment variable flagrelease reads, read here and nowhere else.

Values are read when called, not at import time, so tests (and long-lived workers)
see changes to the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "PREFECT_ENV_DEFAULTS",
    "REPO_ROOT",
    "SECRET_ENV_VARS",
    "aws_credentials",
    "cache_dir",
    "docker_host",
    "gems_exclude",
    "gems_inject",
    "gems_record_dir",
    "gems_vendor",
    "hf_endpoint",
    "hf_token",
    "home_dir",
    "kernel_cache_dirs",
    "modelscope_endpoint",
    "modelscope_token",
    "registry_credentials",
    "release_configs_dir",
    "runtimes_dir",
    "secret_from_env",
    "secret_values",
    "serve_python",
    "services_dir",
    "templates_dir",
    "use_flaggems",
]

#: The checkout (or install prefix) that holds templates/ and release_configs/.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Variables whose values must never reach a log, an artifact or a card.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MODELSCOPE_API_TOKEN",
    "MODELSCOPE_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "REGISTRY_PASSWORD",
    "FLAGRELEASE_REGISTRY_PASSWORD",
    "OPENAI_API_KEY",
)

#: Prefect settings flagrelease runs Prefect with, unless the environment sets them.
#: ``flows/`` and ``tasks/`` set them before Prefect is imported; the servers and workers
#: they start inherit them.  flagrelease's own loggers go to the run page; their records
#: outside a run (the plain-Python pipeline, ``flagrelease deploy``) stay on the console
#: without a warning each; the temporary server Prefect starts when no ``PREFECT_API_URL``
#: is set sends no usage heartbeat (offline, each attempt logs ``Failed to send telemetry``).
PREFECT_ENV_DEFAULTS: dict[str, str] = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "flagrelease",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def home_dir() -> Path:
    """State and caches: ``$FLAGRELEASE_HOME``, else ``~/.cache/flagrelease``."""
    return Path(_env("FLAGRELEASE_HOME") or Path.home() / ".cache" / "flagrelease")


def cache_dir() -> Path:
    """Caches (hub downloads, the generated demo model): ``$FLAGRELEASE_CACHE``, else below :func:`home_dir`."""
    return Path(_env("FLAGRELEASE_CACHE") or home_dir() / "cache")


def runtimes_dir() -> Path:
    """Serving runtimes (virtual environments), ``$FLAGRELEASE_RUNTIMES`` or below home."""
    return Path(_env("FLAGRELEASE_RUNTIMES") or home_dir() / "runtimes")


def services_dir() -> Path:
    """State of the services flagrelease starts itself (dockerd, registry): ``$FLAGRELEASE_SERVICES`` or below home."""
    return Path(_env("FLAGRELEASE_SERVICES") or home_dir() / "services")


def serve_python() -> Path | None:
    """An explicit serving interpreter, ``$FLAGRELEASE_SERVE_PYTHON``, if set."""
    value = _env("FLAGRELEASE_SERVE_PYTHON")
    return Path(value) if value else None


def templates_dir() -> Path:
    """Jinja2 templates and chip profiles, ``$FLAGRELEASE_TEMPLATES`` or ``<repo>/templates``."""
    return Path(_env("FLAGRELEASE_TEMPLATES") or REPO_ROOT / "templates")


def release_configs_dir() -> Path:
    """Release configs, ``$FLAGRELEASE_CONFIGS`` or ``<repo>/release_configs``."""
    return Path(_env("FLAGRELEASE_CONFIGS") or REPO_ROOT / "release_configs")


def hf_endpoint() -> str:
    """The Hugging Face Hub endpoint, ``$HF_ENDPOINT`` or the public hub."""
    return (_env("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_token() -> str | None:
    """The Hugging Face token, from ``$HF_TOKEN`` (or its older name)."""
    return _env("HF_TOKEN") or _env("HUGGING_FACE_HUB_TOKEN")


def modelscope_endpoint() -> str:
    """The ModelScope endpoint, ``$MODELSCOPE_ENDPOINT`` or the public one."""
    return (_env("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn").rstrip("/")


def modelscope_token() -> str | None:
    """The ModelScope token, from ``$MODELSCOPE_API_TOKEN``."""
    return _env("MODELSCOPE_API_TOKEN") or _env("MODELSCOPE_TOKEN")


def aws_credentials() -> dict[str, str]:
    """AWS credentials present in the environment, for boto3 (empty: boto3's own chain)."""
    keys = {
        "aws_access_key_id": "AWS_ACCESS_KEY_ID",
        "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN",
    }
    return {k: v for k, name in keys.items() if (v := _env(name))}


def docker_host() -> str | None:
    """The Docker engine address, ``$DOCKER_HOST``, if set (the docker SDK reads it too)."""
    return _env("DOCKER_HOST")


def registry_credentials() -> dict[str, str] | None:
    """Push credentials, ``$FLAGRELEASE_REGISTRY_USERNAME`` / ``$FLAGRELEASE_REGISTRY_PASSWORD``.

    None when unset: the engine then uses ``docker login``'s stored credentials.
    """
    user, password = _env("FLAGRELEASE_REGISTRY_USERNAME"), _env("FLAGRELEASE_REGISTRY_PASSWORD")
    return {"username": user, "password": password} if user and password else None


def secret_from_env(name: str) -> str | None:
    """The value of the variable ``name`` that a config's ``{secret: NAME}`` reference names, if set."""
    return _env(name)


def secret_values() -> list[str]:
    """The current values of every secret variable, longest first, for redaction."""
    values = {v for name in SECRET_ENV_VARS if (v := _env(name)) and len(v) >= 4}
    return sorted(values, key=len, reverse=True)


def use_flaggems() -> bool:
    """Whether the serving plugin enables FlagGems: ``$USE_FLAGGEMS`` is 1, true or yes."""
    return (_env("USE_FLAGGEMS") or "").strip().lower() in ("1", "true", "yes", "on")


def gems_vendor() -> str | None:
    """The FlagGems vendor name, ``$GEMS_VENDOR`` (``cpu`` selects flagrelease's reference operators)."""
    value = _env("GEMS_VENDOR")
    return value.strip().lower() if value else None


def gems_exclude() -> list[str]:
    """Operators the serving plugin leaves off, ``$FLAGRELEASE_GEMS_EXCLUDE`` (comma separated)."""
    return [op.strip() for op in (_env("FLAGRELEASE_GEMS_EXCLUDE") or "").split(",") if op.strip()]


def gems_record_dir() -> Path | None:
    """Where each serving process records the operators that ran, ``$FLAGRELEASE_GEMS_RECORD``."""
    value = _env("FLAGRELEASE_GEMS_RECORD")
    return Path(value) if value else None


def gems_inject() -> str | None:
    """A deliberately broken (or slowed) operator for tests, ``$FLAGRELEASE_GEMS_INJECT`` (``op[:mode]``)."""
    return _env("FLAGRELEASE_GEMS_INJECT")


def kernel_cache_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """The Triton and FlagGems code caches of a process with environment ``env`` (default: ours).

    Triton's is ``$TRITON_CACHE_DIR`` or ``~/.triton/cache``; FlagGems' generated code is
    ``code_cache`` below ``$FLAGGEMS_CACHE_DIR`` or ``~/.flaggems``.
    """
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    triton = env.get("TRITON_CACHE_DIR") or str(home / ".triton" / "cache")
    gems = env.get("FLAGGEMS_CACHE_DIR") or str(home / ".flaggems")
    return [Path(triton), Path(gems) / "code_cache"]
