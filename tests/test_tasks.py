"""The Prefect task layer's own policy: what is retried, and what is not."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prefect.states import Failed

from flagrelease.constants import REPO_ROOT
from flagrelease.errors import (
    BusyError,
    ConfigError,
    ConvertError,
    DeployError,
    FetchError,
    GateError,
    PublishBlockedError,
    PublishError,
)
from flagrelease.retry import classify, is_transient
from tasks._common import _retry_unless_deterministic, stage_task
from tests.fixtures_prefect import PrefectServer


def _http(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1:9/models/x")
    return httpx.HTTPStatusError(f"{status} error", request=request, response=httpx.Response(status, request=request))


def _caused(outer: Exception, inner: BaseException) -> Exception:
    outer.__cause__ = inner
    return outer


def _port_in_use() -> DeployError:
    from flagrelease.deploy._health import check_port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        try:
            check_port_free("127.0.0.1", s.getsockname()[1], what="vLLM (target)")
        except DeployError as err:
            return err
    raise AssertionError("the port was free")


def _unknown_host() -> FetchError:
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    connect = _caused(httpx.ConnectError("[Errno -2] Name or service not known"), gai)
    return _caused(FetchError("http://hub.invalid/x@main: ConnectError; check that it is reachable"), connect)


def _bad_engine_args() -> DeployError:
    tail = "usage: api_server.py [-h] ...\napi_server.py: error: unrecognized arguments: --max-model-length 256"
    return DeployError(f"the serving engine exited with code 2 before it became ready. Last lines:\n{tail}")


def _s3(status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": str(status)}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


#: (case, error, retried): the retry policy as a table.
RETRY_POLICY: list[tuple[str, BaseException, bool]] = [
    ("config error", ConfigError("serve.engine_args.port: must be > 0"), False),
    ("refused gate", PublishBlockedError("gate verdict inconsistent"), False),
    ("gate error", GateError("no paired samples"), False),
    ("another run holds the release", BusyError("release 'demo' is in use by pid 1"), False),
    ("port in use", _port_in_use(), False),
    ("unknown host", _unknown_host(), False),
    ("bad engine argument", _bad_engine_args(), False),
    ("hub says not found (404)", _caused(FetchError("x: 404"), _http(404)), False),
    ("hub says forbidden (403)", _caused(FetchError("x: 403"), _http(403)), False),
    ("S3 access denied (403)", _caused(PublishError("upload failed"), _s3(403)), False),
    ("damaged checkpoint", ConvertError("tensor 'w' holds 3 NaN"), False),
    ("missing file", FileNotFoundError(2, "No such file or directory", "/x"), False),
    ("a bug", KeyError("model_dir"), False),
    ("hub server error (503)", _caused(FetchError("x: 503"), _http(503)), True),
    ("rate limited (429)", _caused(FetchError("x: 429"), _http(429)), True),
    ("S3 server error (500)", _caused(PublishError("upload failed"), _s3(500)), True),
    ("connection reset", _caused(FetchError("x: reset"), ConnectionResetError(104, "Connection reset by peer")), True),
    ("read timeout", _caused(FetchError("x: timeout"), httpx.ReadTimeout("timed out")), True),
    ("timeout", TimeoutError("timed out"), True),
    ("temporary name resolution failure", socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), True),
    ("refused connection", ConnectionRefusedError(111, "Connection refused"), True),
    ("engine crash at start", DeployError("the serving engine was killed by signal 9 before it became ready"), True),
    ("health timeout", DeployError("the serving engine was not ready within 400s (/health: ConnectError)"), True),
]


@pytest.mark.parametrize(("case", "error", "retried"), RETRY_POLICY, ids=[c for c, _, _ in RETRY_POLICY])
def test_retry_policy(case: str, error: BaseException, retried: bool) -> None:
    task = stage_task("fetch", retries=2)
    assert is_transient(error) is retried, classify(error)
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
@pytest.mark.parametrize(
    ("error", "attempts"), [("ConfigError", 1), ("PublishBlockedError", 1), ("BusyError", 1), ("DeployError", 3)]
)
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
