"""Start a service once, share it between processes, stop it when its last user exits.

:func:`acquire` returns a :class:`Lease` on the service described by a
:class:`ServiceSpec`.  The first caller starts it under a supervisor
(:mod:`flagrelease.services._supervise`); later callers, in this process or another,
find it through its lease socket and take a lease too.  The service stops when the last
lease closes, which the kernel does for a process that dies, ``SIGKILL`` included.  A
pid file records the supervisor and the service, so a start after a crash reaps what a
killed supervisor left behind.  Starts are serialised by a file lock in the service's
folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flagrelease.errors import ServiceError
from flagrelease.services._supervise import READY

__all__ = ["Lease", "ServiceSpec", "acquire", "reap_stale", "running", "short_path"]

log = logging.getLogger("flagrelease.services")

_SUPERVISOR_MODULE = "flagrelease.services._supervise"
_MAX_SOCKET_PATH = 100
#: Supervisors this process started (kept so that their exit status is collected).
_STARTED: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class ServiceSpec:
    """A service flagrelease can start.

    Attributes:
        name: for messages and logs (``dockerd``, ``registry 127.0.0.1:5000``).
        argv: the command that runs it in the foreground.
        folder: its state: pid file, log, lock and (when the path is short enough) lease socket.
        ready: whether it answers yet.
        start_timeout_s: how long it may take to answer.
        grace_s: seconds between SIGTERM and SIGKILL when it stops.
        idle_s: how long a started service waits for its first lease.
    """

    name: str
    argv: list[str]
    folder: Path
    ready: Callable[[], bool] = field(compare=False)
    start_timeout_s: float = 120.0
    grace_s: float = 20.0
    idle_s: float = 60.0

    @property
    def pidfile(self) -> Path:
        """The supervisor's record of the pids it runs."""
        return self.folder / "service.pid"

    @property
    def log_path(self) -> Path:
        """The service's (and its supervisor's) output."""
        return self.folder / "service.log"

    @property
    def lease_socket(self) -> Path:
        """The Unix socket the supervisor hands leases out on."""
        return short_path(self.folder / "lease.sock")


def short_path(path: Path, *, room: int = 0) -> Path:
    """``path``, or a stand-in below ``/tmp`` when it (plus ``room`` characters) is too long for a socket address."""
    if len(str(path)) + room <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"flagrelease-{os.getuid()}-{digest}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / path.name


class Lease:
    """A hold on a running service: it keeps running at least until this is closed.

    Attributes:
        name: the service's name.
        started: whether this lease's holder started it.
        log_path: the service's log.
    """

    def __init__(self, name: str, conn: socket.socket, *, started: bool, log_path: Path) -> None:
        self.name = name
        self.started = started
        self.log_path = log_path
        self._conn: socket.socket | None = conn

    @property
    def closed(self) -> bool:
        """Whether the lease was given back."""
        return self._conn is None

    def close(self) -> None:
        """Give the lease back; the service stops if this was the last one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "held"
        return f"Lease({self.name!r}, started={self.started}, {state})"


def _connect(path: Path, *, timeout: float = 10.0) -> socket.socket | None:
    """A lease on the supervisor listening at ``path``, or None when none answers."""
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
        got = conn.recv(len(READY))
    except OSError:
        conn.close()
        return None
    if got != READY:
        conn.close()
        return None
    conn.settimeout(None)
    return conn


def _process(pid: object, marker: str) -> object | None:
    """The live process ``pid`` if its command line contains ``marker``, else None."""
    import psutil

    if not isinstance(pid, int) or pid <= 1:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return None
    return proc if marker in cmdline else None


def _wait_gone(pid: int, timeout: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def reap_stale(spec: ServiceSpec) -> list[int]:
    """Stop what the pid file of ``spec`` still names (a supervisor or service left by a crash).

    A pid counts only while its command line still matches (the supervisor module, or
    the service's program), so a reused pid is never signalled.

    Returns:
        The pids that were stopped.
    """
    if not spec.pidfile.is_file():
        return []
    try:
        record = json.loads(spec.pidfile.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    reaped: list[int] = []
    supervisor = record.get("supervisor")
    if _process(supervisor, _SUPERVISOR_MODULE) is not None:
        assert isinstance(supervisor, int)
        log.warning("%s: stopping a supervisor left running (pid %d)", spec.name, supervisor)
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        if not _wait_gone(supervisor, spec.grace_s + 15):
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
        reaped.append(supervisor)
    service = record.get("service")
    argv = record.get("argv") or spec.argv
    if _process(service, str(argv[0])) is not None:
        assert isinstance(service, int)
        log.warning("%s: stopping a stale service process group (pid %d)", spec.name, service)
        for sig, wait in ((signal.SIGTERM, spec.grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service, sig)
            if _wait_gone(service, wait):
                break
        reaped.append(service)
    with contextlib.suppress(FileNotFoundError):
        spec.pidfile.unlink()
    return reaped


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _start(spec: ServiceSpec) -> Lease:
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        _SUPERVISOR_MODULE,
        "--socket",
        str(spec.lease_socket),
        "--pidfile",
        str(spec.pidfile),
        "--grace",
        str(spec.grace_s),
        "--idle",
        str(spec.idle_s),
        "--",
        *spec.argv,
    ]
    with open(spec.log_path, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _STARTED.append(proc)
    deadline = time.monotonic() + spec.start_timeout_s
    conn: socket.socket | None = None
    while conn is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise ServiceError(
                f"{spec.name} did not start (supervisor exit {proc.returncode}); its log {spec.log_path} ends "
                f"with:\n{_tail(spec.log_path)}"
            )
        conn = _connect(spec.lease_socket, timeout=2)
        if conn is None:
            time.sleep(0.1)
    lease = Lease(spec.name, conn, started=True, log_path=spec.log_path)
    while not spec.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            lease.close()
            if proc.poll() is None:
                _kill(proc)
            raise ServiceError(
                f"{spec.name} did not answer within {spec.start_timeout_s:.0f}s (supervisor exit {proc.poll()}); "
                f"its log {spec.log_path} ends with:\n{_tail(spec.log_path)}"
            )
        time.sleep(0.2)
    log.info("%s: started (supervisor pid %d; log %s)", spec.name, proc.pid, spec.log_path)
    return lease


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def running(spec: ServiceSpec) -> Lease | None:
    """A lease on the service of ``spec`` if it runs under flagrelease's supervisor, else None."""
    conn = _connect(spec.lease_socket)
    if conn is None:
        return None
    lease = Lease(spec.name, conn, started=False, log_path=spec.log_path)
    if spec.ready():
        return lease
    lease.close()
    return None


def acquire(spec: ServiceSpec) -> Lease:
    """A lease on the service of ``spec``: the running one, else one started now.

    Raises:
        ServiceError: it did not start or answer in time (the message ends with its log).
    """
    from filelock import FileLock, Timeout

    for proc in list(_STARTED):
        if proc.poll() is not None:
            _STARTED.remove(proc)
    spec.folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(spec.folder / "service.lock"), timeout=spec.start_timeout_s + spec.grace_s + 60):
            conn = _connect(spec.lease_socket)
            if conn is not None:
                lease = Lease(spec.name, conn, started=False, log_path=spec.log_path)
                deadline = time.monotonic() + spec.start_timeout_s
                while not spec.ready():
                    if time.monotonic() > deadline:
                        lease.close()
                        raise ServiceError(
                            f"{spec.name} runs under flagrelease's supervisor but does not answer; its log "
                            f"{spec.log_path} ends with:\n{_tail(spec.log_path)}"
                        )
                    time.sleep(0.2)
                return lease
            reap_stale(spec)
            return _start(spec)
    except Timeout as err:
        raise ServiceError(
            f"another process holds {spec.folder / 'service.lock'} while starting {spec.name}; wait for it, or "
            "remove the lock file if no flagrelease process runs"
        ) from err
