"""flagrelease.services: services started once, shared by leases, stopped with their last user.

A small HTTP server (``python -m http.server``) stands for the service in the lease tests,
which check real processes: a lease held by another process keeps the service up, its
SIGKILL stops it, a stale pid file is reaped (and a pid reused by another program is
not), a killed supervisor takes its service down.  The registry tests start Debian's
``docker-registry``, as the image stage does.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from flagrelease.errors import ServiceError
from flagrelease.services import (
    ServiceSpec,
    acquire,
    ensure_engine,
    ensure_registry,
    is_loopback_registry,
    reap_stale,
    registry_answers,
)
from tests.fixtures_prefect import free_port


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _spec(folder: Path, port: int) -> ServiceSpec:
    return ServiceSpec(
        name=f"http.server {port}",
        argv=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(folder)],
        folder=folder,
        ready=lambda: _answers(port),
        start_timeout_s=30,
        grace_s=5,
        idle_s=30,
    )


def _gone(check: object, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


_HOLDER = """
import sys, time
from pathlib import Path
from tests.test_services import _spec
from flagrelease.services import acquire
lease = acquire(_spec(Path(sys.argv[1]), int(sys.argv[2])))
print(f"LEASED started={lease.started}", flush=True)
time.sleep(600)
"""


def test_a_lease_in_another_process_keeps_the_service_and_its_sigkill_stops_it(tmp_path: Path) -> None:
    port = free_port()
    spec = _spec(tmp_path, port)
    lease = acquire(spec)
    assert lease.started and _answers(port)
    record = json.loads(spec.pidfile.read_text())
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path), str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        assert ready and holder.stdout.readline().strip() == "LEASED started=False"
        lease.close()
        time.sleep(1.5)
        assert _answers(port), "the other process's lease keeps it running"
        assert json.loads(spec.pidfile.read_text())["service"] == record["service"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert _gone(lambda: _answers(port)), "the service outlived its last lease holder"
    assert _gone(
        lambda: psutil.pid_exists(record["service"]) and psutil.Process(record["service"]).status() != "zombie"
    )
    assert _gone(spec.pidfile.exists)


def test_a_killed_supervisor_takes_its_service_down(tmp_path: Path) -> None:
    port = free_port()
    spec = _spec(tmp_path, port)
    with acquire(spec):
        record = json.loads(spec.pidfile.read_text())
        os.kill(record["supervisor"], signal.SIGKILL)
        assert _gone(lambda: _answers(port)), "the parent-death signal did not stop the service"
    # The next start reaps the left-over pid file and starts afresh.
    with acquire(spec) as again:
        assert again.started and _answers(port)
        assert json.loads(spec.pidfile.read_text())["supervisor"] != record["supervisor"]


def test_stale_pid_files_are_reaped_but_reused_pids_are_left_alone(tmp_path: Path) -> None:
    port = free_port()
    spec = _spec(tmp_path, port)
    stray = subprocess.Popen([*spec.argv[:3], "--bind", "127.0.0.1", str(free_port())], start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        spec.pidfile.write_text(json.dumps({"supervisor": other.pid, "service": stray.pid, "argv": spec.argv}))
        assert reap_stale(spec) == [stray.pid]
        assert stray.wait(timeout=30) is not None and other.poll() is None  # `sleep` is no supervisor of ours
        spec.pidfile.write_text(json.dumps({"supervisor": other.pid, "service": other.pid, "argv": spec.argv}))
        with acquire(spec) as lease:
            assert lease.started and _answers(port)
        assert other.poll() is None
    finally:
        for proc in (stray, other):
            proc.kill()
            proc.wait(timeout=10)


def test_a_service_that_cannot_start_says_why(tmp_path: Path) -> None:
    spec = ServiceSpec(
        name="broken",
        argv=[sys.executable, "-c", "import sys; print('boom: no such config'); sys.exit(3)"],
        folder=tmp_path,
        ready=lambda: False,
        start_timeout_s=20,
    )
    with pytest.raises(ServiceError, match=r"(?s)broken did not .*boom: no such config"):
        acquire(spec)
    assert _gone(spec.pidfile.exists)


# -- the Docker engine and the registry ----------------------------------------------------------
def test_an_explicit_docker_host_is_the_only_engine_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/flagrelease/docker.sock")
    with pytest.raises(ServiceError, match=r"no Docker engine answers at unix:///nonexistent.*unset DOCKER_HOST"):
        ensure_engine()


def test_without_root_no_engine_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user other than root (the euid is what dockerd needs), nothing starts and the error says what to do."""
    import flagrelease.services.docker as docker_services

    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("FLAGRELEASE_SERVICES", str(tmp_path / "services"))
    monkeypatch.setattr(docker_services, "DEFAULT_DOCKER_HOST", "unix:///nonexistent/flagrelease/docker.sock")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ServiceError, match=r"only root may start one: start Docker .*DOCKER_HOST"):
        ensure_engine()
    assert not (tmp_path / "services").exists()


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("localhost:5000/flag", True),
        ("[::1]:5000", True),
        ("127.0.0.1", False),
        ("registry.example.com:5000", False),
        ("10.0.0.1:5000", False),
    ],
)
def test_loopback_registries(registry: str, loopback: bool) -> None:
    assert is_loopback_registry(registry) is loopback


def test_a_registry_is_started_on_loopback_and_shared(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError, match="only on loopback"):
        ensure_registry("registry.example.com:5000")
    first = ensure_registry(address, root=tmp_path / "data")
    second = ensure_registry(address, root=tmp_path / "data")
    try:
        assert first.managed and first.lease is not None and first.lease.started
        assert second.lease is not None and not second.lease.started
        assert httpx.get(f"{first.url}/v2/_catalog", timeout=5).json() == {"repositories": []}
        first.close()
        assert registry_answers(first.url)
    finally:
        first.close()
        second.close()
    assert _gone(lambda: registry_answers(first.url))
