"""Session fixture: a real Prefect server on loopback, with its own home and database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

__all__ = ["PrefectServer", "free_port", "prefect_server"]

VENV_BIN = Path(sys.executable).parent
RETRY_CODES = frozenset({429, 502, 503})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrefectServer:
    """A running Prefect server and the environment that points clients at it."""

    api_url: str
    ui_url: str
    home: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The current environment plus what Prefect clients need to reach this server."""
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="INFO",
            **extra,
        )
        return env

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call to the server's REST API, retried as Prefect's own client retries it.

        The server answers 503 when its SQLite database is briefly locked (and 429 or 502 under
        load); Prefect's client retries those, so a test's raw call must too, or it reads a
        write that never happened.  Any other error status fails the call.
        """
        deadline = time.monotonic() + 60
        while True:
            resp = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
            if resp.status_code not in RETRY_CODES or time.monotonic() > deadline:
                resp.raise_for_status()
                return resp
            time.sleep(0.5)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` on a free loopback port; stop it at session end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = home / "server.log"
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
    )
    env.pop("PREFECT_API_URL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield PrefectServer(api_url=api, ui_url=f"http://127.0.0.1:{port}", home=home, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
