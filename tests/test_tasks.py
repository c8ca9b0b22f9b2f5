"""The Prefect task layer's own policy: what is retried, and what is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prefect.states import Failed

from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ConfigError, DeployError, PublishBlockedError
from tasks._common import _retry_unless_deterministic, stage_task
from tests.fixtures_prefect import PrefectServer


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (DeployError("vLLM crashed at start"), True),
        (OSError("connection reset"), True),
        (ConfigError("serve.engine_args.port: must be > 0"), False),
        (PublishBlockedError("gate verdict inconsistent"), False),
    ],
)
def test_retry_condition_skips_deterministic_refusals(error: Exception, retried: bool) -> None:
    task = stage_task("fetch", retries=2)
    assert _retry_unless_deterministic(task, None, Failed(data=error)) is retried  # type: ignore[arg-type]


_SCRIPT = """
import sys
from pathlib import Path
from prefect import flow
from flagrelease import errors
from tasks._common import stage_task

error, config, counter = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def prepare(ctx):
    with counter.open("a") as fh:
        fh.write("attempt\\n")
    raise getattr(errors, error)("refused on purpose by the test")

task = stage_task("fetch", retries=2, retry_delay_seconds=0, prepare=prepare)

@flow
def one_stage():
    task(config, {})

state = one_stage(return_state=True)
print("FINAL", state.type.value)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("error", "attempts"), [("ConfigError", 1), ("PublishBlockedError", 1), ("DeployError", 3)])
def test_real_task_runs_retry_only_transient_errors(
    error: str, attempts: int, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """On the session's Prefect server: two retries for a crash, none for a refusal."""
    counter = tmp_path / "attempts.txt"
    config = REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, error, str(config), str(counter)],
        env=prefect_server.env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "FINAL FAILED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert counter.read_text().count("attempt") == attempts
