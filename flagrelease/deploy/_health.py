"""Readiness, ports and log tails shared by every deploy runtime."""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx

from flagrelease._redact import redact
from flagrelease.errors import DeployError

__all__ = ["check_port_free", "free_port", "log_tail", "port_in_use", "wait_ready"]

#: Engine log lines quoted in errors.
TAIL_LINES = 30


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port`` or holds it bound."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        if s.connect_ex((target, port)) == 0:
            return True
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As servers do: connections of a server that just stopped (TIME_WAIT) do not block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


def check_port_free(host: str, port: int, *, what: str = "the server") -> None:
    """Raise a clear error when ``host:port`` is taken, before anything starts.

    Raises:
        DeployError: the port is in use.
    """
    if port_in_use(host, port):
        raise DeployError(
            f"port {port} on {host} is already in use, so {what} cannot listen there; stop whatever holds it "
            f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another port (serve.engine_args.port)"
        )


def log_tail(path: Path | None, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, redacted ('' when there is none)."""
    if path is None or not Path(path).is_file():
        return ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        tail = deque(fh, maxlen=lines)
    return redact("".join(tail).rstrip())


def _ready(client: httpx.Client, base_url: str, model_name: str) -> str | None:
    """None when /health answers 200 and /v1/models lists the model; else why not."""
    try:
        health = client.get(f"{base_url}/health")
    except httpx.HTTPError as err:
        return f"/health: {type(err).__name__}"
    if health.status_code != 200:
        return f"/health answered {health.status_code}"
    try:
        models = client.get(f"{base_url}/v1/models")
        ids = [m.get("id") for m in models.json().get("data", [])] if models.status_code == 200 else []
    except (httpx.HTTPError, ValueError) as err:
        return f"/v1/models: {type(err).__name__}"
    if model_name not in ids:
        return f"/v1/models lists {ids}, not {model_name!r}"
    return None


def wait_ready(
    base_url: str,
    *,
    model_name: str,
    timeout_s: float,
    exited: Callable[[], str | None],
    log_path: Path | None,
    interval_s: float = 1.0,
) -> float:
    """Wait until the server is healthy and serves ``model_name``.

    Args:
        base_url: ``http://host:port``.
        model_name: the model ``/v1/models`` must list.
        timeout_s: how long to wait.
        exited: returns why the server is gone (e.g. ``"exited with code 1"``), else None;
            checked between polls so a crash fails at once rather than at the timeout.
        log_path: the engine log, quoted in errors.
        interval_s: seconds between polls.

    Returns:
        Seconds it took.

    Raises:
        DeployError: the server exited, or was not ready in time; the message quotes the
            last lines of its log.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    why = "no answer yet"
    with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False) as client:
        while True:
            gone = exited()
            if gone is not None:
                raise DeployError(
                    f"the serving engine {gone} before it became ready at {base_url}. "
                    f"Last lines of {log_path}:\n{log_tail(log_path)}"
                )
            why = _ready(client, base_url, model_name) or ""
            if not why:
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise DeployError(
                    f"the serving engine was not ready at {base_url} within {timeout_s:g}s ({why}). "
                    "Raise serve.health_timeout_s if the model is just slow to load. "
                    f"Last lines of {log_path}:\n{log_tail(log_path)}"
                )
            time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
