"""The local runtime: vLLM's OpenAI server from the serving venv, on this machine.

The server runs under flagrelease's supervisor (:mod:`flagrelease._supervise`): in its
own process group, stopped with everything it started when its owner dies, SIGKILL
included, and reaped from its pid file at the next start if even the supervisor was
killed.  Its output is appended to the engine log.  Teardown stops the whole group:
SIGTERM, a grace period (short when the owner is being interrupted), SIGKILL; nothing is
left running, whatever ended the ``with`` block.  The port is leased for as long as the
server runs (:func:`flagrelease._lease.port_lease`), and the runtime venv is held in use
(:func:`flagrelease.runtime.runtime_in_use`) so that no install removes it meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from flagrelease import constants, render, runtime
from flagrelease._redact import redact
from flagrelease._supervise import SupervisedProcess
from flagrelease.deploy._health import check_port_free, log_tail, wait_ready
from flagrelease.deploy._record import local_record
from flagrelease.deploy._types import Endpoint, ServePlan

__all__ = ["ServerProcess", "local_command", "local_environment", "serve_local", "terminate_tree"]

log = logging.getLogger("flagrelease.deploy")

#: Seconds vLLM gets to shut down after SIGTERM before the group is killed.
GRACE_S = 20.0
#: The same when the owner is being interrupted (SIGTERM, Ctrl-C) or has died.
DEATH_GRACE_S = 3.0


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
    """One supervised server process group, its log, and its teardown."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path, what: str = "vLLM") -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.what = what
        self.proc: SupervisedProcess | None = None

    def start(self) -> int:
        """Start the server; return its group id (the supervisor's pid)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            header = f"\n=== flagrelease: {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n"
            out.write(redact(header).encode())
            out.flush()
            self.proc = SupervisedProcess(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, what=self.what, grace_s=DEATH_GRACE_S
            )
            return self.proc.start()

    def exited(self) -> str | None:
        """Why the server is gone, or None while it runs."""
        return "never started" if self.proc is None else self.proc.exited()

    def stop(self, *, grace_s: float = GRACE_S) -> None:
        """Tear the whole process group down (idempotent)."""
        if self.proc is not None:
            self.proc.stop(grace_s=grace_s)


def local_environment(plan: ServePlan, *, python: Path) -> dict[str, str]:
    """The server's full environment: ours, minus secrets, plus the plan's and the plugin's path."""
    env = {k: v for k, v in os.environ.items() if k not in constants.SECRET_ENV_VARS}
    # Weights are local; never reach for a hub from the server.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.update(plan.env)
    env.update(plan.secret_env())
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
    env = local_environment(plan, python=python)
    if plan.flaggems and plan.cfg.serve.flaggems.clean_caches:
        runtime.clean_kernel_caches(env)
    server = ServerProcess(
        argv, env=env, log_path=plan.log_path, cwd=plan.record_dir.parent, what=f"vLLM ({plan.variant})"
    )
    interrupted = False
    try:
        with runtime.runtime_in_use(python):
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
            record = local_record(
                argv, plan.env, model_dir=plan.model_dir, python=str(python), ran=True, secrets=plan.secret_refs
            )
            try:
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
                    info={"argv": argv, "startup_s": round(took, 1), "executed": [record]},
                )
            except BaseException as err:
                interrupted = not isinstance(err, Exception)  # Ctrl-C, SIGTERM, Prefect's TerminationSignal
                raise
            gone = server.exited()
            if gone is not None:
                log.warning(
                    "[%s] the serving engine %s while in use; last lines of its log:\n%s",
                    plan.variant,
                    gone,
                    log_tail(plan.log_path, 10),
                )
    except BaseException as err:
        interrupted = interrupted or not isinstance(err, Exception)
        raise
    finally:
        server.stop(grace_s=DEATH_GRACE_S if interrupted else GRACE_S)
        log.info("[%s] vLLM stopped", plan.variant)
