"""Shared test setup: state isolation, and the real servers tests use.

Server fixtures live in ``tests/fixtures_*.py`` modules, loaded below; each starts its
server once per session on loopback and stops it when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C works in the session and in what it starts, however the session was started.

    A shell without job control starts a background command (``cmd &`` in a script) with
    SIGINT ignored; the ignore is inherited across exec, and Python then never turns
    SIGINT into KeyboardInterrupt.  The interruption tests, and the tests that stop a
    ``flagrelease serve`` or a Prefect worker with SIGINT, need the default: a handler set
    here is reset to the default in every child at exec.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the whole session, never the user's: the demo model is trained once.

    Set in the environment, so that servers and subprocesses (the demo's run) share it too.
    """
    import os

    cache = tmp_path_factory.mktemp("flagrelease-cache")
    before = os.environ.get("FLAGRELEASE_CACHE")
    os.environ["FLAGRELEASE_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("FLAGRELEASE_CACHE", None)
    else:
        os.environ["FLAGRELEASE_CACHE"] = before


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point flagrelease's state at a per-test folder (caches: one per session); never touch real state.

    The serving runtime (a large venv) is shared: it lives in FLAGRELEASE_RUNTIMES, which
    this fixture leaves alone when set, else points at the real default location.  So are
    the services flagrelease starts (its dockerd with the base images it made, the local
    registry): FLAGRELEASE_SERVICES, likewise.
    """
    import os

    from flagrelease import constants

    runtimes = os.environ.get("FLAGRELEASE_RUNTIMES") or str(constants.runtimes_dir())
    services = os.environ.get("FLAGRELEASE_SERVICES") or str(constants.services_dir())
    home = tmp_path / "flagrelease-home"
    monkeypatch.setenv("FLAGRELEASE_HOME", str(home))
    monkeypatch.setenv("FLAGRELEASE_RUNTIMES", runtimes)
    monkeypatch.setenv("FLAGRELEASE_SERVICES", services)
    for secret in constants.SECRET_ENV_VARS:
        monkeypatch.delenv(secret, raising=False)
    return home
