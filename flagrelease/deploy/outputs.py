"""What the deploy stage hands downstream."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["DeployOutputs"]


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
        load_test: ``rows`` per concurrency, ``startup_s`` and the ``report`` path.
        smoke: the smoke test's request and answer.
        logs: the server's log files.
        endpoint: the base URL served.
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
    load_test: dict[str, Any] = {}
    smoke: dict[str, Any] | None = None
    logs: list[str] = []
    endpoint: str | None = None
