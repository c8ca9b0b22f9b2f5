"""Quiet, useful logs: what real commands print.

Each stage's summary is logged once; the temporary server Prefect starts (no
``PREFECT_API_URL``) sends no telemetry, which offline logs ``ERROR ... Failed to send
telemetry``; Prefect's "process work pool" notice appears at most once; and the demo
without Prefect prints no warning about logs sent to the API without a flow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flagrelease.constants import PREFECT_ENV_DEFAULTS
from flagrelease.pipeline import STAGES
from tests._console import console_text as _console_text
from tests._console import squash as _squash
from tests.fixtures_demo import DemoRun
from tests.fixtures_prefect import PrefectServer, free_port

FLAGRELEASE = str(Path(sys.executable).parent / "flagrelease")
API_WARNING = "attempted to send logs to the API"
pytestmark = [pytest.mark.slow]


@pytest.mark.vllm
def test_each_stage_summary_is_logged_once(demo_run: DemoRun) -> None:
    text = _console_text(demo_run.output)
    for stage in STAGES:
        summary = demo_run.summaries[stage]
        assert len(_squash(summary)) > 20, (stage, summary)
        assert text.count(_squash(summary)) == 1, f"the {stage} summary is not logged once: {summary!r}"


@pytest.mark.vllm
def test_demo_without_prefect_prints_no_api_log_warnings(demo_run: DemoRun, prefect_server: PrefectServer) -> None:
    """The demo's stages are done, so the run mostly reuses them; each stage logs outside any flow run."""
    env = prefect_server.env(FLAGRELEASE_CONFIGS=str(demo_run.config.parent))
    for name in PREFECT_ENV_DEFAULTS:  # flagrelease itself must set them, not this test process
        env.pop(name, None)
    proc = subprocess.run([FLAGRELEASE, "demo", "--no-prefect"], env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    text = _console_text(output)
    for stage in STAGES:  # a flagrelease log record per stage, outside any flow run
        assert f"{stage}:unchangedsinceitslastrun" in text or f"{stage}:starting" in text, (stage, output[-4000:])
    assert API_WARNING not in output and "without a flow run id" not in output, output[-4000:]


def test_deploy_with_prefects_temporary_server_is_quiet(tmp_path: Path) -> None:
    """No PREFECT_API_URL: the command starts a temporary server; requests to the internet fail at once."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and k not in PREFECT_ENV_DEFAULTS}
    dead = f"http://127.0.0.1:{free_port()}"
    env.update(PREFECT_HOME=str(tmp_path / "prefect"))
    for name, value in (("https_proxy", dead), ("http_proxy", dead), ("no_proxy", "127.0.0.1,localhost")):
        env[name] = env[name.upper()] = value
    proc = subprocess.run([FLAGRELEASE, "deploy"], env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert output.count("registered flagrelease/") >= 3, output[-4000:]
    # Offline the heartbeat logs "ERROR ... Failed to send telemetry" (or fails earlier, on the
    # temporary server's fresh database, with a traceback through send_telemetry_heartbeat).
    assert "telemetry" not in output.lower(), output[-4000:]
    assert output.count("process work pool") <= 1, output[-4000:]
    assert API_WARNING not in output, output[-4000:]
