"""The multi-node runtime: a Ray cluster over the hostfile's nodes, vLLM across it.

As FlagScale's serve runner does it: the first node of ``serve.nodes`` is the head.
Every node first stops any stale Ray (``ray stop --force``); the head then runs
``ray start --head --port P``, each other node ``ray start --address HEAD:P``, each with
``--num-gpus`` its hostfile slots; once the cluster has every node, the head runs vLLM's
OpenAI server with ``--distributed-executor-backend ray`` and the release's tensor and
pipeline parallel sizes, which span the nodes.  Teardown stops the server (by the process
id it wrote) and Ray on every node, whatever happened.

Every node gets the same serving environment (chip env, ``serve.envs``, the FlagGems
switches) plus ``VLLM_HOST_IP`` = its own address, and gets it on the ``ray start``
command: Ray's worker processes, where vLLM's workers and the FlagGems plugin run,
inherit the environment of the raylet that started them.

Commands reach the nodes through a :class:`CommandRunner`.  :class:`SshRunner` (the
default) runs ``ssh -p PORT HOST 'env K=V ... cmd'``, or, when ``serve.container_name`` is
set, ``ssh HOST 'docker exec -e K=V ... CONTAINER cmd'`` (the container the image stage's
image runs as on each node); a loopback node runs the command directly.
:class:`RecordingRunner` records what each node would receive, for plans and tests.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flagrelease import render
from flagrelease._redact import redact
from flagrelease.deploy._health import log_tail, wait_ready
from flagrelease.deploy._record import argv_record, env_record
from flagrelease.deploy._types import Endpoint, ServePlan
from flagrelease.deploy.outputs import ExecutedCommand
from flagrelease.errors import DeployError

__all__ = [
    "CommandResult",
    "CommandRunner",
    "NodeCommand",
    "RecordingRunner",
    "SshRunner",
    "multinode_record",
    "plan_multinode",
    "serve_multinode",
    "teardown_commands",
]

log = logging.getLogger("flagrelease.deploy")

RAY_PORT = 6379
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class NodeCommand:
    """One command for one node.

    Attributes:
        host: the node.
        role: ``head`` or ``worker``.
        step: ``ray-stop``, ``ray-start``, ``cluster-check``, ``serve``, ``serve-stop``.
        command: the argv run on the node.
        env: the environment it runs with (beyond the node's own).
        container: the container it runs in, if any.
        background: whether it keeps running (the server) rather than finishing.
    """

    host: str
    role: str
    step: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    container: str | None = None
    background: bool = False

    def remote_line(self) -> str:
        """The shell line the node runs (quoted; no value can break out of its word)."""
        if self.container:
            argv = ["docker", "exec"]
            for key, value in self.env.items():
                argv += ["-e", f"{key}={value}"]
            return shlex.join([*argv, self.container, *self.command])
        if self.env:
            return shlex.join(["env", *(f"{k}={v}" for k, v in self.env.items()), *self.command])
        return shlex.join(self.command)


@dataclass
class CommandResult:
    """What a finished command gave."""

    returncode: int
    output: str = ""


class CommandRunner(Protocol):
    """How commands reach the nodes."""

    def run(self, cmd: NodeCommand, *, timeout_s: float) -> CommandResult:
        """Run a command to completion."""

    def spawn(self, cmd: NodeCommand, *, log_path: Path) -> object:
        """Start a long-running command with its output appended to ``log_path``; return a handle."""

    def alive(self, handle: object) -> str | None:
        """Why the spawned command is gone, or None while it runs."""

    def stop(self, handle: object) -> None:
        """Stop the local end of a spawned command (the remote side is stopped by ``serve-stop``)."""


class SshRunner:
    """Runs node commands over ssh (``BatchMode``: keys, no passwords), or directly on loopback."""

    def __init__(self, *, ssh_port: int = 22, ssh_options: list[str] | None = None) -> None:
        self.ssh_port = ssh_port
        self.ssh_options = list(ssh_options or ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"])

    def argv(self, cmd: NodeCommand) -> list[str]:
        """The local argv that delivers ``cmd`` to its node."""
        if cmd.host in _LOOPBACK:
            return ["bash", "-c", cmd.remote_line()]
        return ["ssh", *self.ssh_options, "-p", str(self.ssh_port), cmd.host, cmd.remote_line()]

    def run(self, cmd: NodeCommand, *, timeout_s: float) -> CommandResult:
        """Run ``cmd`` and wait for it."""
        try:
            proc = subprocess.run(
                self.argv(cmd), capture_output=True, text=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as err:
            return CommandResult(returncode=124, output=f"timed out after {timeout_s:g}s: {err}")
        return CommandResult(returncode=proc.returncode, output=(proc.stdout or "") + (proc.stderr or ""))

    def spawn(self, cmd: NodeCommand, *, log_path: Path) -> object:
        """Start ``cmd``; its output goes to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                self.argv(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self, handle: object) -> str | None:
        """None while the local end runs."""
        assert isinstance(handle, subprocess.Popen)
        code = handle.poll()
        return None if code is None else f"exited with code {code}"

    def stop(self, handle: object) -> None:
        """Stop the local ssh (the node's server is stopped by its pid file)."""
        from flagrelease.deploy.local import terminate_tree

        assert isinstance(handle, subprocess.Popen)
        terminate_tree(handle, grace_s=10)


class RecordingRunner:
    """Records every command instead of running it; each finishes with ``returncode``.

    This stands in for the nodes (hosts no machine here can reach), not for vLLM: it lets
    a plan be printed and lets tests check the exact command and environment each node
    would receive, and the order of start and teardown.
    """

    def __init__(self, *, returncode: int = 0, output: str = "") -> None:
        self.commands: list[NodeCommand] = []
        self.returncode = returncode
        self.output = output
        self.stopped: list[object] = []

    def run(self, cmd: NodeCommand, *, timeout_s: float) -> CommandResult:
        """Record ``cmd``."""
        self.commands.append(cmd)
        return CommandResult(returncode=self.returncode, output=self.output)

    def spawn(self, cmd: NodeCommand, *, log_path: Path) -> object:
        """Record ``cmd``; the handle is the command itself."""
        self.commands.append(cmd)
        return cmd

    def alive(self, handle: object) -> str | None:
        """Spawned commands never end on their own here."""
        return None

    def stop(self, handle: object) -> None:
        """Record the stop."""
        self.stopped.append(handle)

    def steps(self) -> list[tuple[str, str, str]]:
        """``(host, role, step)`` of each command, in order."""
        return [(c.host, c.role, c.step) for c in self.commands]


def _pid_file(plan: ServePlan) -> str:
    return f"/tmp/flagrelease-{plan.cfg.name}-{plan.variant}.pid"


def plan_multinode(
    plan: ServePlan, *, ray_port: int = RAY_PORT, python: str | None = None, secrets: bool = True
) -> list[NodeCommand]:
    """The start commands of every node, in order: stop stale Ray, start Ray, check, serve.

    Args:
        plan: the serve plan (its config lists the nodes; the first is the head).
        ray_port: the Ray head's port.
        python: the interpreter on the nodes (default: the chip profile's).
        secrets: resolve the secret variables into the nodes' environment (False for a plan
            that is only recorded).

    Raises:
        DeployError: fewer than two nodes, or TP x PP needs more devices than the slots.
    """
    cfg = plan.cfg
    nodes = cfg.nodes
    if len(nodes) < 2:
        raise DeployError(
            f"the multinode runtime needs at least two serve.nodes, got {len(nodes)}; "
            "use serve.runtime: local or container for one node",
            model=cfg.name,
            chip=cfg.chip,
        )
    args = cfg.serve.engine_args
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    slots = sum(n.slots for n in nodes)
    if world > slots:
        raise DeployError(
            f"tensor_parallel_size x pipeline_parallel_size = {world} exceeds the {slots} slots of the nodes",
            model=cfg.name,
            chip=cfg.chip,
        )
    python = python or cfg.chip_profile.python
    container = cfg.serve.container_name
    head = nodes[0]
    gpu = cfg.chip_profile.accelerator.value != "cpu"
    cmds: list[NodeCommand] = []
    # The operator record is a folder on this machine; on the nodes it would be lost.
    base_env = {k: v for k, v in plan.env.items() if k != "FLAGRELEASE_GEMS_RECORD"}
    if secrets:
        base_env.update(plan.secret_env())  # reaches the nodes on the command line; logged redacted
    for i, node in enumerate(nodes):
        role = "head" if i == 0 else "worker"
        cmds.append(NodeCommand(node.host, role, "ray-stop", ["ray", "stop", "--force"], container=container))
    for i, node in enumerate(nodes):
        role = "head" if i == 0 else "worker"
        env = {**base_env, "VLLM_HOST_IP": node.host}
        start = ["ray", "start", f"--node-ip-address={node.host}"]
        start += ["--head", f"--port={ray_port}"] if i == 0 else [f"--address={head.host}:{ray_port}"]
        start += [f"--num-gpus={node.slots}"] if gpu else [f"--num-cpus={node.slots}"]
        cmds.append(NodeCommand(node.host, role, "ray-start", start, env=env, container=container))
    check = (
        "import ray, sys; ray.init(address='auto', logging_level='ERROR'); "
        "alive = sum(1 for n in ray.nodes() if n.get('Alive')); print(alive); "
        f"sys.exit(0 if alive >= {len(nodes)} else 3)"
    )
    head_env = {**base_env, "VLLM_HOST_IP": head.host}
    cmds.append(
        NodeCommand(head.host, "head", "cluster-check", [python, "-c", check], env=head_env, container=container)
    )
    serve = render.serve_command(cfg, model_path=str(cfg.serve.model_dir or plan.model_dir), python=python)
    serve += ["--distributed-executor-backend", "ray"]
    # Write the pid, then become the server: teardown signals exactly this process.
    line = f"echo $$ > {shlex.quote(_pid_file(plan))} && exec {shlex.join(serve)}"
    cmds.append(
        NodeCommand(
            head.host, "head", "serve", ["bash", "-c", line], env=head_env, container=container, background=True
        )
    )
    return cmds


def multinode_record(
    plan: ServePlan, cmds: list[NodeCommand], *, ran: bool, reason: str | None = None
) -> list[ExecutedCommand]:
    """The record of a multi-node serve: each node's Ray start, the cluster check and the server."""
    out = []
    for cmd in cmds:
        if cmd.step == "ray-stop":
            continue
        argv = cmd.command
        if cmd.step == "serve":  # the bash wrapper only writes a pid file for teardown
            argv = shlex.split(argv[-1].split(" && exec ", 1)[-1])
        out.append(
            ExecutedCommand(
                node=cmd.host,
                argv=argv_record(argv, model_dir=plan.model_dir),
                env={**env_record(cmd.env), **env_record({}, secrets=plan.secret_refs)},
                ran=ran,
                reason=reason,
                role=cmd.role,
                step=cmd.step,
                runtime="multinode",
                container=cmd.container,
            )
        )
    return out


def teardown_commands(plan: ServePlan) -> list[NodeCommand]:
    """Stop the server on the head (SIGTERM, then SIGKILL after 20 s) and Ray on every node."""
    cfg = plan.cfg
    container = cfg.serve.container_name
    pid = shlex.quote(_pid_file(plan))
    stop = (
        f"if [ -f {pid} ]; then p=$(cat {pid}); kill -TERM $p 2>/dev/null; "
        f"for i in $(seq 20); do kill -0 $p 2>/dev/null || break; sleep 1; done; "
        f"kill -KILL $p 2>/dev/null; rm -f {pid}; fi"
    )
    head = cfg.nodes[0]
    cmds = [NodeCommand(head.host, "head", "serve-stop", ["bash", "-c", stop], container=container)]
    for i, node in enumerate(cfg.nodes):
        role = "head" if i == 0 else "worker"
        cmds.append(NodeCommand(node.host, role, "ray-stop", ["ray", "stop", "--force"], container=container))
    return cmds


def _base_url(plan: ServePlan) -> str:
    head = plan.cfg.nodes[0].host
    host = plan.host if plan.host not in ("127.0.0.1", "::1") or head in _LOOPBACK else head
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{plan.port}"


@contextlib.contextmanager
def serve_multinode(
    plan: ServePlan,
    *,
    runner: CommandRunner | None = None,
    ray_port: int = RAY_PORT,
    cluster_timeout_s: float = 120,
) -> Iterator[Endpoint]:
    """Start Ray on every node and vLLM on the head; tear all of it down at the end.

    Args:
        plan: the serve plan.
        runner: how commands reach the nodes (default :class:`SshRunner`).
        ray_port: the Ray head's port.
        cluster_timeout_s: how long the nodes may take to join.

    Yields:
        The healthy endpoint on the head.

    Raises:
        DeployError: a node's command failed, the cluster did not form, or the server
            was not ready in time (the message quotes the log's last lines).
    """
    runner = runner or SshRunner()
    cmds = plan_multinode(plan, ray_port=ray_port)
    base_url = _base_url(plan)
    handle: object = None
    try:
        for cmd in cmds:
            with open(plan.log_path, "a", encoding="utf-8") as out:
                out.write(redact(f"=== flagrelease: [{cmd.host} {cmd.role}] {cmd.step}: {cmd.remote_line()}\n"))
            if cmd.background:
                handle = runner.spawn(cmd, log_path=plan.log_path)
                continue
            deadline = time.monotonic() + (cluster_timeout_s if cmd.step == "cluster-check" else 0)
            while True:
                res = runner.run(cmd, timeout_s=120)
                with open(plan.log_path, "a", encoding="utf-8") as out:
                    out.write(redact(res.output))
                if res.returncode == 0 or cmd.step == "ray-stop":
                    break
                if time.monotonic() >= deadline:
                    raise DeployError(
                        f"multinode: {cmd.step} failed on {cmd.host} (exit {res.returncode}). "
                        "Check that every node is reachable by ssh with keys and has Ray and vLLM installed. "
                        f"Last lines of {plan.log_path}:\n{log_tail(plan.log_path)}",
                        model=plan.cfg.name,
                        chip=plan.cfg.chip,
                    )
                time.sleep(2)
        took = wait_ready(
            base_url,
            model_name=plan.model_name,
            timeout_s=plan.health_timeout_s,
            exited=lambda: runner.alive(handle) if handle is not None else "never started",
            log_path=plan.log_path,
        )
        yield Endpoint(
            base_url=base_url,
            model_name=plan.model_name,
            log_path=plan.log_path,
            gems_record_path=None,
            variant=plan.variant,
            runtime="multinode",
            flaggems=plan.flaggems,
            record_dir=None,
            info={
                "nodes": [n.hostfile_line() for n in plan.cfg.nodes],
                "startup_s": round(took, 1),
                "executed": multinode_record(plan, cmds, ran=True),
            },
        )
    finally:
        for cmd in teardown_commands(plan):
            try:
                runner.run(cmd, timeout_s=60)
            except OSError as err:  # keep tearing the other nodes down
                log.warning("multinode teardown: %s on %s failed: %s", cmd.step, cmd.host, err)
        if handle is not None:
            runner.stop(handle)
