"""The supervisor of one managed service: ``python -m flagrelease.services._supervise``.

It starts the service (its own session and process group, with a parent-death signal),
records both in a pid file, and hands out leases on a Unix socket: every process that
uses the service holds one connection.  When the last lease closes -- its holder exited,
``SIGKILL`` included, since the kernel closes the socket -- or when nobody took a lease
within ``--idle`` seconds, the supervisor stops the service: ``SIGTERM`` to its process
group, ``SIGKILL`` after ``--grace`` seconds.  If the supervisor itself is killed, the
service gets ``SIGTERM`` from the kernel (``PR_SET_PDEATHSIG``), and the next start reaps
whatever the pid file still names.

Standard library only: it must start fast and never import flagrelease's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
#: What a lease holder reads after connecting: the service is up and stays up for it.
READY = b"ok\n"


def _die_with_parent() -> None:
    """In the service's process, before exec: ask the kernel for SIGTERM when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _stop(child: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM the service's process group, then SIGKILL what is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    try:
        return child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return -9


def main(argv: list[str] | None = None) -> int:
    """Run the service in ``argv`` under lease supervision; returns the service's exit code."""
    parser = argparse.ArgumentParser(prog="flagrelease.services._supervise")
    parser.add_argument("--socket", required=True, type=Path, help="the lease socket to listen on")
    parser.add_argument("--pidfile", required=True, type=Path, help="where to record the pids")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--idle", type=float, default=120.0, help="stop when nobody took a lease this long")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the service's argv")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the service's command after --")

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    with contextlib.suppress(FileNotFoundError):
        args.socket.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(args.socket))
    listener.listen(64)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    _write_json(
        args.pidfile,
        {"supervisor": os.getpid(), "service": child.pid, "argv": command, "started": time.time()},
    )
    print(f"supervisor {os.getpid()}: started {command[0]} as pid {child.pid}", flush=True)

    clients: list[socket.socket] = []
    had_client = False
    started = time.monotonic()
    code: int | None = None
    try:
        while not stopping:
            code = child.poll()
            if code is not None:
                print(f"supervisor: {command[0]} exited with {code}", flush=True)
                break
            if not clients and (had_client or time.monotonic() - started > args.idle):
                print("supervisor: no lease left; stopping the service", flush=True)
                break
            try:
                readable, _, _ = select.select([listener, *clients], [], [], 0.5)
            except InterruptedError:
                continue
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    try:
                        conn.sendall(READY)
                    except OSError:
                        conn.close()
                        continue
                    clients.append(conn)
                    had_client = True
                    continue
                try:
                    data = sock.recv(64)
                except OSError:
                    data = b""
                if not data:
                    clients.remove(sock)
                    sock.close()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            args.socket.unlink()
        if code is None:
            code = _stop(child, args.grace)
        for sock in clients:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            args.pidfile.unlink()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
