"""The supervisor of one server process group (see :mod:`flagrelease._supervise`).

Run as ``python -m flagrelease._supervisor --parent PID --grace S --pid-file F -- ARGV...``,
in a new session whose group it leads, with a parent-death signal of SIGTERM.  It starts
ARGV in its group and then waits:

- ARGV exits: whatever it left in the group is stopped; the supervisor exits with its code;
- SIGTERM, SIGINT or SIGHUP (the owner died, or is being interrupted): the group gets
  SIGTERM, ``--grace`` seconds, then SIGKILL; the supervisor exits 128 + the signal;
- SIGUSR1 (the owner stops the server and waits as long as it wants): the group gets
  SIGTERM, and the supervisor goes on waiting for ARGV as above.

It removes its pid file on the way out.  Standard library only, so it starts fast and
works with any interpreter.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.1


def _members(pgid: int) -> list[int]:
    """Pids of live processes in group ``pgid`` other than this one (from /proc)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue


def _stop_group(child: subprocess.Popen[bytes], grace_s: float) -> None:
    pgid = os.getpgid(0)
    _signal_all(_members(pgid), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        if not _members(pgid):
            return
        time.sleep(_POLL_S)
    for _ in range(3):  # processes forked while the others were being killed
        left = _members(pgid)
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        time.sleep(_POLL_S)
    child.poll()


def main(argv: list[str] | None = None) -> int:
    """Supervise one command; return its exit status (143 when stopped by a signal)."""
    parser = argparse.ArgumentParser(prog="flagrelease._supervisor")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--pid-file")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    stop = {"signal": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop["signal"] = signum

    def on_drain(signum: int, frame: FrameType | None) -> None:
        # The owner stops the server and waits for it as long as it likes: pass SIGTERM on.
        _signal_all(_members(os.getpgid(0)), signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGUSR1, on_drain)
    try:
        if os.getppid() != args.parent:  # the owner died before the death signal was armed
            return 143
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        while True:
            if stop["signal"]:
                _stop_group(child, args.grace)
                return 128 + stop["signal"]
            code = child.poll()
            if code is not None:
                _stop_group(child, 0.5)
                return code if code >= 0 else 128 - code
            time.sleep(_POLL_S)
    finally:
        if args.pid_file:
            Path(args.pid_file).unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
