"""What the deploy stage hands downstream."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["DeployOutputs", "ExecutedCommand"]


class ExecutedCommand(StageOutputs):
    """What the deploy stage ran on one node, or would have run there (the card's "How to Run").

    Attributes:
        node: the host (``localhost`` for this machine).
        argv: the server's command; inside the container when ``image`` is set.
        env: the environment given to it: name -> value, or ``{"secret": NAME}`` for a
            secret (never its value).
        image: the image it ran in, by digest (``ref@sha256:...``), None outside a container.
        mounts: bind mounts, ``{"source": ..., "target": ...}`` (the source relative to the
            bundle where it lies in it).
        ran: whether it ran here.
        reason: why it did not run, when it did not.
        role: ``server`` (one node), ``head`` or ``worker`` (a Ray cluster).
        step: ``serve``, or for a Ray cluster ``ray-stop``, ``ray-start``, ``cluster-check``.
        runtime: ``local``, ``container`` or ``multinode``.
        container: the container a multi-node command runs in (``docker exec``), if any.
        docker_flags: the chip's ``docker run`` flags (container runtime).
        ports: published ports, ``host_ip:host_port:container_port`` (container runtime).

    Paths of this machine never appear: the served weights are ``weights/`` (the folder the
    published weights are downloaded into), the serving interpreter is ``python``.
    """

    node: str = "localhost"
    argv: list[str] = []
    env: dict[str, str | dict[str, str]] = {}
    image: str | None = None
    mounts: list[dict[str, str]] = []
    ran: bool = False
    reason: str | None = None
    role: str = "server"
    step: str = "serve"
    runtime: str = "local"
    container: str | None = None
    docker_flags: list[str] = []
    ports: list[str] = []


class DeployOutputs(StageOutputs):
    """How the target was served, and what the serving showed.

    Attributes:
        serve_dir: the rendered FlagScale configs.
        serve_files: their names, relative to ``serve_dir``.
        runtime: ``local``, ``container`` or ``multinode``.
        command: the serve argv (a dry run only).
        python: the serving runtime's interpreter.
        gems_ops: the operators the operator library ran.
        gems_calls: calls per operator.
        gems_library: the operator library that served (``flag_gems`` or the CPU stand-in).
        flag_gems_version: flag_gems' version, when it served.
        triton_share: the share of operator calls served by Triton kernels, when measured.
        load_test: ``rows`` per concurrency, ``startup_s`` and the ``report`` path.
        smoke: the smoke test's request and answer.
        logs: the server's log files.
        endpoint: the base URL served.
        executed: what ran on each node (:class:`ExecutedCommand`), for the card.
    """

    serve_dir: str
    serve_files: list[str] = []
    runtime: str = ""
    command: list[str] = []
    python: str | None = None
    gems_ops: list[str] = []
    gems_calls: dict[str, Any] = {}
    gems_library: str | None = None
    flag_gems_version: str | None = None
    triton_share: float | None = None
    load_test: dict[str, Any] = {}
    smoke: dict[str, Any] | None = None
    logs: list[str] = []
    endpoint: str | None = None
    executed: list[ExecutedCommand] = []
