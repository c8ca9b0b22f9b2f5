"""Session fixtures for serving: the vLLM runtime, a tiny model, a running server.

- ``serve_python``: the serving interpreter: ``$FLAGRELEASE_SERVE_PYTHON`` if set, else
  the runtime venv made by ``flagrelease runtime install`` (``.ci/setup`` runs it; the
  fixture runs it too, idempotently, so a fresh machine gets it).
- ``tiny_model``: a tiny Qwen2 with random weights (``generate_tiny_model(steps=0)``):
  hidden 128, 2 heads of 64, its own byte-level BPE tokenizer.  Untrained on purpose:
  its nearly flat logits make any change to an operator's output show in greedy text.
- ``tiny_release``: a release config for that model on the cpu chip (FlagGems on, eager
  mode, a free port, a short load test); ``make_release(**overrides)`` builds variants.
- ``vllm_server``: one real vLLM server of ``tiny_release`` through
  :func:`flagrelease.deploy.serving` (FlagGems on, so the CPU reference operators run),
  shared by the whole session and torn down at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from flagrelease.config import ReleaseConfig
from tests.fixtures_prefect import free_port

__all__ = [
    "free_port",
    "make_release",
    "serve_python",
    "server_processes",
    "tiny_model",
    "tiny_release",
    "vllm_server",
    "with_serve_python",
]


def server_processes(*markers: str) -> list[psutil.Process]:
    """Live processes whose command line holds every marker (a unique path or port)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] != psutil.STATUS_ZOMBIE and all(m in line for m in markers):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def make_release(model: Path, work: Path, /, **serve: Any) -> ReleaseConfig:
    """A cpu release of the model folder ``model``; ``serve`` keys override the ``serve`` section."""
    data: dict[str, Any] = {
        "name": "tiny-vllm",
        "model": {"source": "local", "repo_id": "flagrelease/tiny-qwen2", "path": str(model)},
        "chip": "cpu",
        "serve": {
            "engine_args": {
                "served_model_name": "tiny-qwen2-flagos",
                "max_model_len": 256,
                "max_num_seqs": 8,
                "dtype": "bfloat16",
                "enforce_eager": True,
                "port": free_port(),
            },
            "flaggems": {"enabled": True},
            "health_timeout_s": 400,
            "load_test": {"concurrency": [1, 2], "requests_per_level": 3, "max_tokens": 8, "timeout_s": 120},
        },
        "eval": {"reference": {"chip": "cpu"}},
        "work_dir": str(work),
    }
    for key, value in serve.items():
        if isinstance(value, dict) and isinstance(data["serve"].get(key), dict):
            data["serve"][key] = {**data["serve"][key], **value}
        else:
            data["serve"][key] = value
    return ReleaseConfig.model_validate(data)


@pytest.fixture(scope="session")
def serve_python() -> Path:
    """The serving interpreter (installed on first use, as ``flagrelease runtime install`` does)."""
    from flagrelease import constants
    from flagrelease.runtime import ensure_runtime

    return constants.serve_python() or ensure_runtime("cpu")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 folder with its tokenizer."""
    from flagrelease.tinymodel import generate_tiny_model

    return generate_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen2", steps=0)


@pytest.fixture(scope="session")
def tiny_release(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ReleaseConfig:
    """The release config the session server serves."""
    return make_release(tiny_model, tmp_path_factory.mktemp("tiny-release"))


@pytest.fixture(scope="session")
def vllm_server(
    serve_python: Path, tiny_model: Path, tiny_release: ReleaseConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A real vLLM server of the tiny model, FlagGems on, for the whole session (an Endpoint)."""
    import contextlib
    import os

    from flagrelease.deploy import serving

    logs = tmp_path_factory.mktemp("vllm-server-logs")
    with contextlib.ExitStack() as stack:
        previous = os.environ.get("FLAGRELEASE_SERVE_PYTHON")
        os.environ["FLAGRELEASE_SERVE_PYTHON"] = str(serve_python)
        try:  # the interpreter is resolved at start; other tests must not inherit the override
            endpoint = stack.enter_context(serving(tiny_release, model_dir=tiny_model, log_dir=logs, variant="session"))
        finally:
            if previous is None:
                os.environ.pop("FLAGRELEASE_SERVE_PYTHON", None)
            else:
                os.environ["FLAGRELEASE_SERVE_PYTHON"] = previous
        yield endpoint


@pytest.fixture
def with_serve_python(serve_python: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Path]:
    """Point FLAGRELEASE_SERVE_PYTHON at the session's serving interpreter for one test."""
    monkeypatch.setenv("FLAGRELEASE_SERVE_PYTHON", str(serve_python))
    return lambda: serve_python
