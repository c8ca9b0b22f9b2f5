"""Child processes that die with their owner, SIGKILL of the owner included.

A server flagrelease starts (vLLM and its engine processes, a temporary Prefect server)
runs under a small supervisor (:mod:`flagrelease._supervisor`, stdlib only):

- the supervisor leads its own process group, and everything it starts stays in it;
- it gets ``SIGTERM`` from the kernel when its owner dies, however it died
  (``prctl(PR_SET_PDEATHSIG)``), and then stops the whole group: ``SIGTERM``, a grace
  period, ``SIGKILL``; one thread that lasts as long as the owner forks every supervisor,
  since the kernel sends that signal when the forking *thread* ends;
- when the server exits by itself, it stops what the server left in the group;
- a pid file in :func:`state_dir` records the group and its owner, so that if the
  supervisor itself was killed outright, the next start reaps the group
  (:func:`reap_orphans`).

Only Linux has a parent-death signal; elsewhere the pid files still reap leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import psutil

from flagrelease._atomic import atomic_write_json

__all__ = [
    "ServerStopped",
    "StopScope",
    "SupervisedProcess",
    "group_members",
    "kill_group",
    "reap_orphans",
    "set_parent_death_signal",
    "state_dir",
    "stop_all",
]

log = logging.getLogger("flagrelease.processes")

#: Servers of this process that :func:`stop_all` stops (those started with ``stop_on_exit``).
_running: set[SupervisedProcess] = set()
_running_lock = threading.RLock()

_PR_SET_PDEATHSIG = 1

#: Starts for the thread that starts supervisors (see :func:`_spawn`).
_spawn_queue: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], Callable[[], Any]]] | None = None

#: The :class:`StopScope` a thread's new servers join (see :meth:`StopScope.entered`).
_scope = threading.local()


class StopScope:
    """The servers one piece of work starts, so that they, and only they, can be stopped early.

    A thread enters the scope (:meth:`entered`); each server it starts meanwhile joins the
    scope. :meth:`stop` may come from any thread, before, during or after those starts: it
    stops the servers started so far, and a server started after it is stopped at once
    and refused with :class:`ServerStopped`. Other servers of the process are left alone
    (an eval's interrupted start ahead must not stop a server someone else runs).
    """

    def __init__(self, why: str = "the work that started it was stopped") -> None:
        self.why = why
        self._lock = threading.Lock()
        self._servers: list[SupervisedProcess] = []
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    @contextlib.contextmanager
    def entered(self) -> Iterator[StopScope]:
        """Servers this thread starts in the block join the scope."""
        outer = getattr(_scope, "current", None)
        _scope.current = self
        try:
            yield self
        finally:
            _scope.current = outer

    def stop(self, *, grace_s: float = 3.0) -> int:
        """Stop the scope's servers, now and any started later; return how many were running."""
        with self._lock:
            self._stopped = True
            servers = list(self._servers)
        for server in servers:
            server.stop(grace_s=grace_s)
        return len(servers)

    def _join(self, server: SupervisedProcess) -> bool:
        with self._lock:
            if not self._stopped:
                self._servers.append(server)
            return not self._stopped


def _spawn(start: Callable[[], subprocess.Popen[bytes]]) -> Future[subprocess.Popen[bytes]]:
    """Run ``start`` on the one thread that starts every supervisor of this process.

    The kernel's parent-death signal fires when the *thread* that forked the child exits,
    not the process: a server started by a short-lived thread (a worker of a pool that is
    shut down, a thread of a test) would be stopped as that thread ended.  The spawning
    thread is a daemon that lives as long as the process (it is never joined at exit), so
    the signal comes when the owner dies, as meant.
    """
    global _spawn_queue
    done: Future[subprocess.Popen[bytes]] = Future()
    with _running_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(target=_spawn_loop, args=(_spawn_queue,), name="flagrelease-spawn", daemon=True).start()
        _spawn_queue.put((done, start))
    return done


def _spawn_loop(jobs: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], Callable[[], Any]]]) -> None:
    while True:
        done, start = jobs.get()
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)


def _forget_spawner() -> None:
    global _spawn_queue
    _spawn_queue = None  # a forked child has no spawning thread: it starts its own


os.register_at_fork(after_in_child=_forget_spawner)


def _stop_unowned(started: Future[subprocess.Popen[bytes]]) -> None:
    """Stop a supervisor whose start was interrupted in its owner (nobody holds it)."""
    if started.cancelled() or started.exception() is not None:
        return
    proc = started.result()
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)  # the supervisor stops its group and exits (not waited for here)


class ServerStopped(RuntimeError):
    """A server was started in a :class:`StopScope` that had been stopped."""


def state_dir() -> Path:
    """Machine-wide state of this user's flagrelease processes (pid files, port leases).

    Kept below the system's temporary folder, not below ``FLAGRELEASE_HOME``: servers and
    ports are shared by every flagrelease run on the machine, whatever its home.
    """
    path = Path(tempfile.gettempdir()) / f"flagrelease-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def stop_all(*, grace_s: float = 3.0) -> int:
    """Stop every server this process started with ``stop_on_exit`` (an interrupted run); return how many.

    Safe to call from a signal handler in the main thread while other threads serve: a
    server stopped here makes whatever waits on it fail fast.
    """
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop(grace_s=grace_s)
    return len(servers)


def group_members(pgid: int, *, exclude: int | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.pid != exclude and os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def kill_group(pgid: int, *, grace_s: float, exclude: int | None = None) -> None:
    """Stop every process of group ``pgid``: SIGTERM, wait up to ``grace_s``, then SIGKILL."""
    members = group_members(pgid, exclude=exclude)
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(members, timeout=max(0.0, grace_s))
    late = group_members(pgid, exclude=exclude)  # anything started while the others stopped
    for proc in {p.pid: p for p in [*alive, *late]}.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs([*alive, *late], timeout=5)


def _pid_files() -> Path:
    path = state_dir() / "processes"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _started(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def reap_orphans() -> list[dict[str, Any]]:
    """Kill the process groups of supervised servers whose owner is gone; return their records.

    A record is stale when its owner process no longer exists (or its pid now belongs to
    another process).  Its group is killed only while the group still is the one recorded:
    the supervisor runs with its recorded start time, or it is gone and no other group
    leader took its pid.
    """
    reaped = []
    for path in sorted(_pid_files().glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            owner, owner_started = int(rec["owner_pid"]), float(rec["owner_started"])
            pgid, started = int(rec["pgid"]), float(rec["started"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        alive = _started(owner)
        if alive is not None and abs(alive - owner_started) < 1.0:
            continue  # its owner still runs
        leader = _started(pgid)
        if leader is None or abs(leader - started) < 1.0:
            members = group_members(pgid)
            if members:
                log.warning(
                    "stopping %d leftover process(es) of %s (owner pid %d is gone)",
                    len(members),
                    rec.get("what", "a server"),
                    owner,
                )
                kill_group(pgid, grace_s=2.0)
                reaped.append(rec)
        path.unlink(missing_ok=True)
    return reaped


class SupervisedProcess:
    """One command run under the supervisor, with its process group and pid file.

    Args:
        argv: the command.
        env: its environment.
        cwd: its working folder.
        stdout: where its output goes (a file opened for writing), else inherited.
        what: a name for logs and pid files (``vLLM (target)``, ``Prefect server``).
        grace_s: how long the supervisor waits after SIGTERM when its owner dies.
        stop_on_exit: stop it in :func:`stop_all` (when the owner is being interrupted).
    """

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: IO[bytes] | None = None,
        what: str = "a server",
        grace_s: float = 5.0,
        stop_on_exit: bool = True,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stdout = stdout
        self.what = what
        self.grace_s = grace_s
        self.stop_on_exit = stop_on_exit
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid_file: Path | None = None

    @property
    def pid(self) -> int | None:
        """The supervisor's pid, which is also the group id."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> int:
        """Reap orphans of earlier runs, start the supervisor and the command; return the group id.

        Raises:
            ServerStopped: the thread's :class:`StopScope` was stopped (before or during the start).
        """
        scope: StopScope | None = getattr(_scope, "current", None)
        if scope is not None and scope.stopped:
            raise ServerStopped(f"{self.what} was not started: {scope.why}")
        reap_orphans()
        me = os.getpid()
        self.pid_file = _pid_files() / f"{me}-{time.monotonic_ns()}.json"
        supervisor = [
            sys.executable,
            "-m",
            "flagrelease._supervisor",
            "--parent",
            str(me),
            "--grace",
            str(self.grace_s),
            "--pid-file",
            str(self.pid_file),
            "--",
            *self.argv,
        ]
        env = dict(self.env if self.env is not None else os.environ)

        def popen() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                supervisor,
                stdin=subprocess.DEVNULL,
                stdout=self.stdout,
                stderr=subprocess.STDOUT if self.stdout is not None else None,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=set_parent_death_signal,  # prctl must run in the child, before exec
            )

        started = _spawn(popen)
        try:
            self.proc = started.result()
        except BaseException:  # interrupted while it started: stop it once it has
            started.add_done_callback(_stop_unowned)
            raise
        atomic_write_json(
            self.pid_file,
            {
                "what": self.what,
                "pgid": self.proc.pid,
                "started": _started(self.proc.pid) or time.time(),
                "owner_pid": me,
                "owner_started": _started(me) or 0.0,
                "argv": self.argv[:6],
            },
        )
        if self.stop_on_exit:
            with _running_lock:
                _running.add(self)
        if scope is not None and not scope._join(self):
            self.stop(grace_s=0.0)
            raise ServerStopped(f"{self.what} was stopped as it started: {scope.why}")
        return self.proc.pid

    def exited(self) -> str | None:
        """Why the command is gone, or None while it runs."""
        if self.proc is None:
            return "never started"
        code = self.proc.poll()
        if code is None:
            return None
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"

    def stop(self, *, grace_s: float = 20.0) -> None:
        """Stop the command and everything it started (idempotent): SIGTERM, ``grace_s``, SIGKILL."""
        if self.proc is None:
            return
        with _running_lock:
            _running.discard(self)
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pgid, signal.SIGUSR1)  # the supervisor passes SIGTERM to its group
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        kill_group(pgid, grace_s=0.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
