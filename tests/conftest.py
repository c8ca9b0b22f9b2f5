"""Shared test setup: state isolation, and the real servers tests use.

Server fixtures live in ``tests/fixtures_*.py`` modules, loaded below; each starts its
server once per session on loopback and stops it when the session ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures_docker",
    "tests.fixtures_vllm",
    "tests.fixtures_s3",
    "tests.fixtures_hub",
    "tests.fixtures_prefect",
    "tests.fixtures_demo",
]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point flagrelease's state and caches at a per-test folder; never touch real state.

    The serving runtime (a large venv) is shared: it lives in FLAGRELEASE_RUNTIMES, which
    this fixture leaves alone when set, else points at the real default location.
    """
    import os

    from flagrelease import constants

    runtimes = os.environ.get("FLAGRELEASE_RUNTIMES") or str(constants.runtimes_dir())
    home = tmp_path / "flagrelease-home"
    monkeypatch.setenv("FLAGRELEASE_HOME", str(home))
    monkeypatch.setenv("FLAGRELEASE_RUNTIMES", runtimes)
    for secret in constants.SECRET_ENV_VARS:
        monkeypatch.delenv(secret, raising=False)
    return home
