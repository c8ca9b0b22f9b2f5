"""What every deploy runtime takes and gives: the serve plan and the live endpoint."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease import render
from flagrelease._atomic import atomic_write_json
from flagrelease.config import ReleaseConfig

__all__ = ["Endpoint", "ServePlan", "merge_gems_record"]

log = logging.getLogger("flagrelease.deploy")


@dataclass
class ServePlan:
    """One server to start: everything a runtime needs, already checked.

    Attributes:
        cfg: the release (with the port actually used).
        model_dir: the weights on this machine.
        variant: the name logs are kept under (``target``, ``reference``, a trial label).
        log_path: the engine log file in the bundle's logs.
        record_dir: where each serving process records the FlagGems operators that ran.
        host: the address the server listens on and is reached at.
        port: its port.
        flaggems: whether FlagGems (or the CPU reference operators) is on.
        excluded_ops: operators left off.
        env: the serving environment's additions (chip env, serve.envs, FlagGems switches),
            literal values only.
        health_timeout_s: how long readiness may take.
        secret_refs: variables given by reference (``serve.envs`` ``{secret: NAME}``):
            variable -> secret name, resolved only into the server's environment at start.
    """

    cfg: ReleaseConfig
    model_dir: Path
    variant: str
    log_path: Path
    record_dir: Path
    host: str
    port: int
    flaggems: bool
    excluded_ops: list[str]
    env: dict[str, str]
    health_timeout_s: float
    secret_refs: dict[str, str] = field(default_factory=dict)

    def secret_env(self) -> dict[str, str]:
        """The secret variables resolved (for a process's environment only: never a file or a log).

        Raises:
            ConfigError: a secret is not set; the message says how to set it.
        """
        return render.serve_secrets(self.cfg) if self.secret_refs else {}

    @property
    def model_name(self) -> str:
        """The name the OpenAI endpoint serves the model under."""
        return self.cfg.served_model_name

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def merge_gems_record(record_dir: Path) -> dict[str, int]:
    """Sum the per-process ``ops-<pid>.json`` records in ``record_dir``."""
    total: Counter[str] = Counter()
    if not record_dir.is_dir():
        return {}
    for path in sorted(record_dir.glob("ops-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a file being replaced right now; the next read has it
            continue
        if isinstance(data, dict):
            total.update({str(k): int(v) for k, v in data.items() if isinstance(v, int)})
    return dict(sorted(total.items()))


@dataclass
class Endpoint:
    """A served model, healthy and answering.

    Attributes:
        base_url: ``http://host:port`` (the OpenAI API is below ``/v1``).
        model_name: the served model name.
        log_path: the engine log.
        gems_record_path: the merged record of FlagGems operators that ran
            (``{op: calls}`` JSON, rewritten by :meth:`gems_ops` and at teardown).
        pid: the server's process id (local runtime), if any.
        container: the container name (container runtime), if any.
        variant: the variant served.
        runtime: ``local``, ``container`` or ``multinode``.
        flaggems: whether FlagGems was on.
        record_dir: the per-process records behind ``gems_record_path``.
        info: runtime details (argv, ports, node commands) for reports.
    """

    base_url: str
    model_name: str
    log_path: Path
    gems_record_path: Path | None
    pid: int | None = None
    container: str | None = None
    variant: str = "target"
    runtime: str = "local"
    flaggems: bool = False
    record_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The OpenAI API root, ``base_url + "/v1"``."""
        return f"{self.base_url}/v1"

    def gems_ops(self) -> dict[str, int]:
        """The FlagGems operators that ran so far, merged over processes, and save them.

        Records are rewritten once a second by each process, so a call right after a
        request may miss its last second.
        """
        if self.record_dir is not None and self.record_dir.is_dir():
            ops = merge_gems_record(self.record_dir)
            if self.gems_record_path is not None:
                atomic_write_json(self.gems_record_path, ops)
            return ops
        if self.gems_record_path is not None and self.gems_record_path.is_file():
            data = json.loads(self.gems_record_path.read_text(encoding="utf-8"))
            return {str(k): int(v) for k, v in data.items()}
        return {}

    def plugin_processes(self) -> list[dict[str, Any]]:
        """What the plugin reported at start in each serving process (mode, version, operators)."""
        if self.record_dir is None or not self.record_dir.is_dir():
            return []
        out = []
        for path in sorted(self.record_dir.glob("plugin-*.json")):
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return out
