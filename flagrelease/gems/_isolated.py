"""Run a command in its own process group with a time limit, and say how it ended.

The probe runs each step and each operator through :func:`run_isolated`, so a kernel
that faults or hangs takes down only its own process (and that process's children).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flagrelease._redact import redact

__all__ = ["IsolatedRun", "run_isolated", "signal_name"]


@dataclass
class IsolatedRun:
    """How one worker process ended.

    Attributes:
        status: ``ok`` (exit 0), ``error`` (non-zero exit), ``crash`` (killed by a
            signal, e.g. SIGABRT/SIGSEGV from a faulting kernel) or ``timeout``.
        returncode: the exit status (negative: the signal), None on timeout.
        seconds: wall time.
        tail: the last lines of the process's output, secrets redacted.
        log: the file holding its whole output.
    """

    status: str
    returncode: int | None
    seconds: float
    tail: str
    log: str


def run_isolated(
    argv: Sequence[str], *, timeout_s: float, log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> IsolatedRun:
    """Run ``argv`` in its own process group with a time limit; kill the whole group on timeout.

    Args:
        argv: the command (no shell).
        timeout_s: seconds before the process group gets SIGKILL.
        log_path: where stdout and stderr go.
        env: the environment (default: this one).
        cwd: the working directory.

    Returns:
        How it ended, with the tail of its output.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # Children of the worker (compilers, autotuners) go with it, whatever happened.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            # A process stuck in the driver may take a while to go; never wait on it forever.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
    seconds = time.monotonic() - t0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    tail = redact("\n".join(text.strip().splitlines()[-15:]))
    if rc is None:
        status = "timeout"
    elif rc == 0:
        status = "ok"
    elif rc < 0:
        status = "crash"
    else:
        status = "error"
    return IsolatedRun(status=status, returncode=rc, seconds=round(seconds, 3), tail=tail, log=str(log_path))


def signal_name(num: int) -> str:
    """The name of signal ``num`` (``SIGABRT``), or ``signal N`` when it has none."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
