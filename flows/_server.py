"""A Prefect API for one command: the configured server, else a temporary one this process owns.

Without ``PREFECT_API_URL``, Prefect starts its own temporary server (uvicorn) as a plain
child process, which outlives a killed parent.  :func:`prefect_api` starts the same
server (the same application factory and settings: no UI, ephemeral, final) under
flagrelease's supervisor instead (:mod:`flagrelease._supervise`), so it dies with the
command that started it, SIGKILL included, and points Prefect at it.  Prefect's analytics
are off for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from flagrelease._supervise import SupervisedProcess
from flagrelease.errors import FlagReleaseError

__all__ = ["prefect_api"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain_prefect_clients() -> None:
    """Send the logs and events Prefect still holds while the server can take them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: the run's outcome is already decided
            worker.drain_all(timeout=2)


@contextlib.contextmanager
def prefect_api(*, timeout_s: float = 120.0) -> Iterator[str]:
    """Yield the Prefect API URL to use, starting a temporary server when none is configured.

    Args:
        timeout_s: how long the temporary server may take to answer ``/api/health``.

    Yields:
        The API URL (``http://127.0.0.1:PORT/api`` for a temporary server).

    Raises:
        FlagReleaseError: the temporary server did not start (the message says why).
    """
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield str(settings.api.url)
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update(settings.to_environment_variables(exclude_unset=True))
    env.update(
        PREFECT_UI_ENABLED="0",
        PREFECT__SERVER_EPHEMERAL="1",
        PREFECT__SERVER_FINAL="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).resolve().parent.parent)]
    argv += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "error", "--lifespan", "on"]
    # Kept through an interruption, so the run can still report its state; stopped last, below.
    server = SupervisedProcess(argv, env=env, what="the temporary Prefect server", grace_s=3.0, stop_on_exit=False)
    server.start()
    previous = os.environ.get("PREFECT_API_URL")
    try:
        _wait_healthy(url, server, timeout_s)
        os.environ["PREFECT_API_URL"] = url  # for child processes and Prefect's own threads
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_clients()
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        server.stop(grace_s=3.0)


def _wait_healthy(url: str, server: SupervisedProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            gone = server.exited()
            if gone is not None:
                raise FlagReleaseError(
                    f"the temporary Prefect server {gone} before it answered at {url}; run "
                    "`prefect server start` yourself and set PREFECT_API_URL, or run with --no-prefect"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise FlagReleaseError(
                    f"the temporary Prefect server did not answer at {url} within {timeout_s:g}s; run "
                    "`prefect server start` yourself and set PREFECT_API_URL, or run with --no-prefect"
                )
            time.sleep(0.25)
