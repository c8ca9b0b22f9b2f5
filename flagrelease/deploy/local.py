"""The local runtime: vLLM's OpenAI server from the serving venv, on this machine.

The server runs in its own session (process group), with its output appended to the
engine log.  On Linux it is started through ``setpriv --pdeathsig KILL`` when available,
so it dies with the process that started it even if that one is killed outright.
Teardown sends SIGTERM to the whole group, waits, then SIGKILLs the group and any
descendant that left it; nothing is left running, whatever ended the ``with`` block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from flagrelease import constants, render, runtime
from flagrelease._redact import redact
from flagrelease.deploy._health import check_port_free, log_tail, wait_ready
from flagrelease.deploy._types import Endpoint, ServePlan

__all__ = ["ServerProcess", "local_command", "local_environment", "serve_local", "terminate_tree"]

log = logging.getLogger("flagrelease.deploy")

#: Seconds vLLM gets to shut down after SIGTERM before the group is killed.
GRACE_S = 20.0


def terminate_tree(proc: subprocess.Popen[bytes], *, grace_s: float = GRACE_S) -> None:
    """Stop ``proc``, its process group and every descendant: SIGTERM, wait, SIGKILL.

    Args:
        proc: a process started with ``start_new_session=True`` (its pid is its group id).
        grace_s: seconds to wait after SIGTERM.
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(psutil.Error):
        for child in family:
            if child.is_running() and os.getpgid(child.pid) != proc.pid:
                child.terminate()
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    _, alive = psutil.wait_procs(family, timeout=max(0.0, deadline - time.monotonic()))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class ServerProcess:
    """One server process tree, its log, and its teardown."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        """Start the server; return its pid."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        setpriv = shutil.which("setpriv")
        if setpriv and os.name == "posix":
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as out:
            header = f"\n=== flagrelease: {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n"
            out.write(redact(header).encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self.proc.pid

    def exited(self) -> str | None:
        """Why the server is gone, or None while it runs."""
        if self.proc is None:
            return "never started"
        code = self.proc.poll()
        if code is None:
            return None
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"

    def stop(self, *, grace_s: float = GRACE_S) -> None:
        """Tear the whole process tree down (idempotent)."""
        if self.proc is not None:
            terminate_tree(self.proc, grace_s=grace_s)


def local_environment(plan: ServePlan, *, python: Path) -> dict[str, str]:
    """The server's full environment: ours, minus secrets, plus the plan's and the plugin's path."""
    env = {k: v for k, v in os.environ.items() if k not in constants.SECRET_ENV_VARS}
    # Weights are local; never reach for a hub from the server.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.update(plan.env)
    if plan.flaggems:
        extra = runtime.plugin_pythonpath(python)
        if extra:
            env["PYTHONPATH"] = os.pathsep.join([*extra, *filter(None, [env.get("PYTHONPATH")])])
    return env


def local_command(plan: ServePlan, *, python: Path) -> list[str]:
    """The argv of vLLM's OpenAI server for ``plan``."""
    return render.serve_command(plan.cfg, model_path=str(plan.model_dir), python=str(python))


@contextlib.contextmanager
def serve_local(plan: ServePlan, *, python: Path | None = None) -> Iterator[Endpoint]:
    """Serve ``plan`` on this machine until the block ends.

    Args:
        plan: the checked serve plan.
        python: the serving interpreter (default: :func:`flagrelease.runtime.serve_python`).

    Yields:
        The healthy endpoint.

    Raises:
        DeployError: the port is taken, the engine exits during start, or it is not
            ready in time (the message quotes the log's last lines).
    """
    python = python or runtime.serve_python(plan.cfg.chip)
    check_port_free(plan.host, plan.port, what=f"vLLM ({plan.variant})")
    argv = local_command(plan, python=python)
    server = ServerProcess(
        argv, env=local_environment(plan, python=python), log_path=plan.log_path, cwd=plan.record_dir.parent
    )
    try:
        pid = server.start()
        log.info("[%s] vLLM starting (pid %d) on %s; log: %s", plan.variant, pid, plan.base_url, plan.log_path)
        took = wait_ready(
            plan.base_url,
            model_name=plan.model_name,
            timeout_s=plan.health_timeout_s,
            exited=server.exited,
            log_path=plan.log_path,
        )
        log.info("[%s] vLLM ready in %.0fs", plan.variant, took)
        yield Endpoint(
            base_url=plan.base_url,
            model_name=plan.model_name,
            log_path=plan.log_path,
            gems_record_path=None,
            pid=pid,
            variant=plan.variant,
            runtime="local",
            flaggems=plan.flaggems,
            record_dir=plan.record_dir,
            info={"argv": argv, "startup_s": round(took, 1)},
        )
        gone = server.exited()
        if gone is not None:
            log.warning(
                "[%s] the serving engine %s while in use; last lines of its log:\n%s",
                plan.variant,
                gone,
                log_tail(plan.log_path, 10),
            )
    finally:
        server.stop()
        log.info("[%s] vLLM stopped", plan.variant)
