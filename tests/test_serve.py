"""``flagrelease serve``: it takes over this machine's work-pool deployments, leaves other chips' alone, and gives back.

Against the session's real Prefect server: two releases are registered for workers
(``flagrelease deploy``), one on the CPU (paused by hand) and one on NVIDIA H100.  Serving
them from this process takes the CPU one over and leaves the H100 one to its pool; Ctrl-C
(SIGINT) gives the CPU one back exactly as it was (its work pool, still paused), and
``--take-over`` also serves, then gives back, the H100 one.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flagrelease.constants import REPO_ROOT
from tests._console import unwrapped
from tests.fixtures_demo import write_demo_config
from tests.fixtures_prefect import PrefectServer

pytestmark = [pytest.mark.slow]

FLAGRELEASE = str(Path(sys.executable).parent / "flagrelease")


def _deployment(server: PrefectServer, name: str) -> dict[str, Any] | None:
    try:
        return dict(server.api("GET", f"/deployments/name/flagrelease/{name}").json())
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise


def _configs(tmp_path: Path) -> tuple[Path, str, str]:
    suffix = secrets.token_hex(3)
    cpu, h100 = f"serve-cpu-{suffix}", f"serve-h100-{suffix}"
    folder = tmp_path / "configs"
    write_demo_config(folder, tmp_path, name=cpu)
    nvidia = yaml.safe_load((REPO_ROOT / "release_configs" / "deepseek-r1-distill-qwen-32b-nvidia.yaml").read_text())
    nvidia["work_dir"] = str(tmp_path / "h100-work")
    (folder / f"{h100}.yaml").write_text(yaml.safe_dump(nvidia, sort_keys=False))
    return folder, cpu, h100


def _serve(server: PrefectServer, folder: Path, *extra: str, ready: Any) -> str:
    """Run ``flagrelease serve`` until ``ready()``, then Ctrl-C it; return its output."""
    serve = subprocess.Popen(
        [FLAGRELEASE, "serve", "--config-dir", str(folder), *extra],
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert serve.poll() is None, serve.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the served deployments never registered"
            time.sleep(1)
        time.sleep(2)  # serving has started: its deployments are registered
        os.killpg(serve.pid, signal.SIGINT)
        out, _ = serve.communicate(timeout=90)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert serve.returncode == 0, out[-3000:]
    return unwrapped(out)


def test_serve_takes_over_only_this_machines_deployments_and_gives_them_back(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    folder, cpu, h100 = _configs(tmp_path)
    subprocess.run(
        [FLAGRELEASE, "deploy", "--config-dir", str(folder)],
        env=prefect_server.env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    before_cpu, before_h100 = _deployment(prefect_server, cpu), _deployment(prefect_server, h100)
    assert before_cpu and before_h100 and before_cpu["work_pool_name"] == "cpu"
    assert before_h100["work_pool_name"] == "nvidia-h100"
    prefect_server.api("PATCH", f"/deployments/{before_cpu['id']}", json={"paused": True})
    assert (_deployment(prefect_server, cpu) or {})["paused"] is True

    def cpu_served() -> bool:
        now = _deployment(prefect_server, cpu)
        return now is not None and now["work_pool_name"] is None

    out = _serve(prefect_server, folder, ready=cpu_served)
    assert f"not serving flagrelease/{h100}: it belongs to the nvidia-h100 work pool" in out
    assert f"gave flagrelease/{cpu} back to its work pool" in out
    after_cpu, after_h100 = _deployment(prefect_server, cpu), _deployment(prefect_server, h100)
    assert after_cpu and after_cpu["work_pool_name"] == "cpu" and after_cpu["paused"] is True
    assert after_cpu["parameters"] == before_cpu["parameters"] and after_cpu["pull_steps"] == before_cpu["pull_steps"]
    assert after_h100 == before_h100  # never touched: same id, pool and state

    def h100_served() -> bool:
        now = _deployment(prefect_server, h100)
        return now is not None and now["work_pool_name"] is None

    out = _serve(prefect_server, folder, "--take-over", ready=h100_served)
    assert f"gave flagrelease/{h100} back to its work pool" in out
    back = _deployment(prefect_server, h100)
    assert back and back["work_pool_name"] == "nvidia-h100" and back["paused"] is False
    assert back["parameters"] == before_h100["parameters"] and back["tags"] == before_h100["tags"]
