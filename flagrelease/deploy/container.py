"""The container runtime: ``docker run`` of the release image, served on loopback.

The container gets the chip profile's ``docker run`` flags, the weights mounted
read-only at ``serve.model_dir`` (default ``/models/<model>``), the serving environment
as ``-e`` options, and the engine's port published on ``127.0.0.1`` only (unless the
chip's flags put it on the host network, where vLLM listens on the configured host
itself).  Its command is the release's vLLM command with the image's python
(:attr:`ChipProfile.python`).  ``docker logs -f`` streams into the engine log from the
start, and teardown is ``docker rm -f``, always.  A container whose owner was killed before
its teardown (SIGKILL) carries the owner in a label and is removed at the next start.

The Docker CLI is used (argv lists, never a shell) so the same flags the chip profile
lists for FlagScale's ``docker run`` reach Docker unchanged.  ``DOCKER_HOST`` is honoured.

On this CPU machine the release image built in tests has no vLLM in it (its dependencies
are skipped offline), so the tests serve from an image made locally from the test Python
base image, with the serving venv mounted from the host (``docker_args``); the runtime
code path is the same one a vendor image takes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import psutil

from flagrelease import render
from flagrelease._redact import redact
from flagrelease.deploy._health import check_port_free, wait_ready
from flagrelease.deploy._record import WEIGHTS, argv_record, env_record
from flagrelease.deploy._types import Endpoint, ServePlan
from flagrelease.deploy.outputs import ExecutedCommand
from flagrelease.errors import DeployError

__all__ = [
    "OWNER_LABEL",
    "RECORD_MOUNT",
    "container_command",
    "container_record",
    "docker_run_argv",
    "model_mount",
    "reap_containers",
    "serve_container",
]

log = logging.getLogger("flagrelease.deploy")

#: Where the FlagGems operator record folder is mounted inside the container.
RECORD_MOUNT = "/var/run/flagrelease-gems"
#: The label naming the process that started a serving container (``pid:start-time``).
OWNER_LABEL = "io.flagrelease.owner"
_HOST_NET = ("--net=host", "--network=host")


def _docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise DeployError(
            "the container runtime needs the docker CLI, which is not installed; install docker.io "
            "(.ci/setup does) or serve with serve.runtime: local"
        )
    return docker


def _host_network(flags: list[str]) -> bool:
    if any(f in _HOST_NET for f in flags):
        return True
    return any(a in ("--net", "--network") and b == "host" for a, b in itertools.pairwise(flags))


def _owner(pid: int | None = None) -> str:
    """``pid:start-time`` of a process (default: this one), which a reused pid does not match."""
    pid = os.getpid() if pid is None else pid
    try:
        return f"{pid}:{psutil.Process(pid).create_time():.0f}"
    except psutil.Error:
        return f"{pid}:0"


def reap_containers(docker: str) -> list[str]:
    """Remove serving containers whose owner process is gone (it was killed before its teardown).

    Returns:
        The names of the containers removed.
    """
    proc = subprocess.run(
        [
            docker,
            "ps",
            "--all",
            "--filter",
            "label=io.flagrelease.serve=1",
            "--format",
            f'{{{{.Names}}}} {{{{.Label "{OWNER_LABEL}"}}}}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    gone = []
    for line in proc.stdout.splitlines():
        name, _, owner = line.strip().partition(" ")
        pid = owner.partition(":")[0]
        if not name or not pid.isdigit() or _owner(int(pid)) == owner:
            continue  # no owner recorded, or its owner still runs
        log.warning("removing the serving container %s: the process that started it (%s) is gone", name, owner)
        subprocess.run([docker, "rm", "--force", name], capture_output=True, timeout=120, check=False)
        gone.append(name)
    return gone


def model_mount(plan: ServePlan) -> str:
    """Where the weights appear inside the container."""
    return plan.cfg.serve.model_dir or f"/models/{render.model_slug(plan.cfg)}"


def container_command(plan: ServePlan) -> list[str]:
    """The vLLM command run inside the container."""
    cfg = plan.cfg
    flags = cfg.chip_profile.docker_run_flags
    if not _host_network(flags):
        # Published ports reach the container's own interface, not its loopback.
        args = cfg.serve.engine_args.model_copy(update={"host": "0.0.0.0"})
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"engine_args": args})})
    return render.serve_command(cfg, model_path=model_mount(plan), python=cfg.chip_profile.python)


def docker_run_argv(plan: ServePlan, *, image_ref: str, name: str, docker_args: list[str] | None = None) -> list[str]:
    """The full ``docker run`` argv for ``plan`` (without the ``docker`` binary itself)."""
    cfg = plan.cfg
    flags = list(cfg.chip_profile.docker_run_flags)
    argv = ["run", "--detach", "--name", name, "--label", "io.flagrelease.serve=1"]
    argv += ["--label", f"io.flagrelease.release={cfg.name}", "--label", f"io.flagrelease.variant={plan.variant}"]
    argv += ["--label", f"{OWNER_LABEL}={_owner()}"]  # reaped by the next start if its owner is gone
    argv += flags
    argv += ["--volume", f"{plan.model_dir}:{model_mount(plan)}:ro"]
    env = dict(plan.env)
    if "FLAGRELEASE_GEMS_RECORD" in env:
        argv += ["--volume", f"{plan.record_dir}:{RECORD_MOUNT}"]
        env["FLAGRELEASE_GEMS_RECORD"] = RECORD_MOUNT
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    for key in plan.secret_refs:  # the value comes from the docker CLI's environment, never the argv
        argv += ["--env", key]
    if not _host_network(flags):
        argv += ["--publish", f"127.0.0.1:{plan.port}:{plan.port}"]
    argv += list(docker_args or [])
    return [*argv, image_ref, *container_command(plan)]


def container_record(
    plan: ServePlan, *, image_ref: str | None, ran: bool, reason: str | None = None
) -> ExecutedCommand:
    """The record of a container serve: the command inside the image, its environment, mounts and ports.

    Extra ``docker_args`` of the caller are left out: they are this machine's, not the release's.
    """
    flags = list(plan.cfg.chip_profile.docker_run_flags)
    env = {k: v for k, v in plan.env.items() if k != "FLAGRELEASE_GEMS_RECORD"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return ExecutedCommand(
        node="localhost",
        argv=argv_record(container_command(plan), model_dir=plan.model_dir),
        env=env_record(env, secrets=plan.secret_refs),
        image=image_ref,
        mounts=[{"source": WEIGHTS, "target": model_mount(plan), "mode": "ro"}],
        ran=ran,
        reason=reason,
        runtime="container",
        docker_flags=flags,
        ports=[] if _host_network(flags) else [f"127.0.0.1:{plan.port}:{plan.port}"],
    )


def _state(docker: str, name: str) -> str | None:
    """Why the container is not running, or None while it runs."""
    proc = subprocess.run(
        [docker, "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}} {{.State.Error}}", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        return "container is gone"
    running, _, rest = proc.stdout.strip().partition(" ")
    if running == "true":
        return None
    code, _, error = rest.partition(" ")
    return f"container exited with code {code}" + (f" ({error})" if error else "")


@contextlib.contextmanager
def serve_container(
    plan: ServePlan, *, image_ref: str, docker_args: list[str] | None = None, grace_s: int = 20
) -> Iterator[Endpoint]:
    """Serve ``plan`` in a container of ``image_ref`` until the block ends.

    Args:
        plan: the checked serve plan.
        image_ref: the image to run (the image stage's ``image_ref``).
        docker_args: more ``docker run`` options (extra mounts, say).
        grace_s: seconds ``docker stop`` waits before the container is removed by force.

    Yields:
        The healthy endpoint.

    Raises:
        DeployError: docker is missing or refuses to start the container, the port is
            taken, the engine exits during start or is not ready in time.
    """
    docker = _docker()
    reap_containers(docker)
    check_port_free("127.0.0.1", plan.port, what=f"the container ({plan.variant})")
    name = f"flagrelease-{plan.cfg.name}-{plan.variant}-{secrets.token_hex(3)}"
    # The container may run as a non-root user; it writes its operator record here.
    plan.record_dir.mkdir(parents=True, exist_ok=True)
    plan.record_dir.chmod(0o777)
    argv = docker_run_argv(plan, image_ref=image_ref, name=name, docker_args=docker_args)
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.log_path, "a", encoding="utf-8") as out:
        out.write(redact(f"\n=== flagrelease: docker {' '.join(argv)}\n"))
    logs: subprocess.Popen[bytes] | None = None
    try:
        run = subprocess.run(
            [docker, *argv],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, **plan.secret_env()},
        )
        if run.returncode != 0:
            raise DeployError(
                f"docker run of {image_ref} failed (exit {run.returncode}): {redact(run.stderr.strip())[-2000:]}. "
                "Check that the image exists locally (the image stage builds it) and the Docker engine runs.",
                model=plan.cfg.name,
                chip=plan.cfg.chip,
            )
        with open(plan.log_path, "ab") as out:
            logs = subprocess.Popen(
                [docker, "logs", "--follow", name], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        log.info("[%s] container %s starting on %s; log: %s", plan.variant, name, plan.base_url, plan.log_path)
        took = wait_ready(
            plan.base_url,
            model_name=plan.model_name,
            timeout_s=plan.health_timeout_s,
            exited=lambda: _state(docker, name),
            log_path=plan.log_path,
        )
        log.info("[%s] container ready in %.0fs", plan.variant, took)
        yield Endpoint(
            base_url=plan.base_url,
            model_name=plan.model_name,
            log_path=plan.log_path,
            gems_record_path=None,
            container=name,
            variant=plan.variant,
            runtime="container",
            flaggems=plan.flaggems,
            record_dir=plan.record_dir,
            info={
                "docker_run": argv,
                "image": image_ref,
                "startup_s": round(took, 1),
                "executed": [container_record(plan, image_ref=image_ref, ran=True)],
            },
        )
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [docker, "stop", "--time", str(grace_s), name], capture_output=True, timeout=grace_s + 30, check=False
            )
        subprocess.run([docker, "rm", "--force", name], capture_output=True, timeout=120, check=False)
        if logs is not None:
            try:
                logs.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logs.kill()
                logs.wait(timeout=10)
        log.info("[%s] container %s removed", plan.variant, name)
