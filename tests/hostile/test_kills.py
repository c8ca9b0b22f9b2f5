"""Kills and concurrent runs: nothing outlives ``flagrelease run``, and one run per release at a time.

The heavy cases start a real ``flagrelease run`` (fetch, convert, deploy of the tiny
model on the CPU) in its own session, wait until its vLLM server answers and the deploy
stage's load test is under way, and then kill the run: SIGKILL or SIGTERM, with and
without Prefect (without ``PREFECT_API_URL``, so flagrelease starts its temporary
Prefect server).  Every process of the run's tree,
snapshotted just before the kill (the vLLM server, its ``VLLM::EngineCore``, the
resource tracker, the supervisor, the temporary Prefect server) must be gone shortly
after; SIGTERM must end the run within 10 seconds.  While the first run serves, a second
run of the same release must refuse at once, naming the first.

The light cases check the same guarantees on small stand-ins: the demo refusing at once
while its release is held, and the reaping of a server group whose supervisor was killed
too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests._interrupt import interrupted_after
from tests.fixtures_demo import write_demo_config
from tests.fixtures_prefect import free_port

FLAGRELEASE = str(Path(sys.executable).parent / "flagrelease")
#: This module's counts (also added to the suite's totals).
COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report(totals: Counter[str]) -> Iterator[None]:
    yield
    totals.update({f"kills_{k}": v for k, v in COUNTS.items()})
    if COUNTS["cases"]:
        print(
            f"\nkills: {COUNTS['cases']} runs killed, {COUNTS['processes']} processes in their trees, "
            f"{COUNTS['orphans']} orphans after the kill, slowest SIGTERM exit {COUNTS['sigterm_ms'] / 1000:.1f}s, "
            f"{COUNTS['second_refused']} of {COUNTS['second_tried']} second runs refused at once"
        )


def _alive(procs: list[tuple[psutil.Process, float]]) -> list[psutil.Process]:
    out = []
    for proc, started in procs:
        try:
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _tree(pid: int) -> list[tuple[psutil.Process, float]]:
    root = psutil.Process(pid)
    family = [root, *root.children(recursive=True)]
    out = []
    for proc in family:
        try:
            out.append((proc, proc.create_time()))
        except psutil.Error:
            continue
    return out


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return str(proc.pid)


# -- light: stand-ins ------------------------------------------------------------------------
def _hold(code: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("prefect", [False, True], ids=["no-prefect", "prefect"])
def test_a_second_demo_refuses_at_once_naming_the_first(tmp_path: Path, prefect: bool) -> None:
    configs = tmp_path / "configs"
    config = write_demo_config(configs, tmp_path)
    work = yaml.safe_load(config.read_text())["work_dir"]
    holder = _hold(
        "import time\nfrom pathlib import Path\nfrom flagrelease._lease import release_lock\n"
        f"with release_lock(Path({work!r}), release='demo-tiny-cpu'):\n    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**os.environ, "FLAGRELEASE_CONFIGS": str(configs), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    try:
        started = time.monotonic()
        proc = subprocess.run(
            [FLAGRELEASE, "demo", *([] if prefect else ["--no-prefect"])],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    COUNTS["second_tried"] += 1
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"release 'demo-tiny-cpu' (work folder {work}) is in use by pid {holder.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr and took < 45, took  # a CLI start, on a loaded 2-core machine
    assert not (Path(work) / "state").exists()  # it did nothing
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # refused before any Prefect server started
    COUNTS["second_refused"] += 1


def test_a_server_group_whose_supervisor_was_killed_too_is_reaped_at_the_next_start(tmp_path: Path) -> None:
    from flagrelease._supervise import reap_orphans

    owner = _hold(
        "import sys, time\nfrom flagrelease._supervise import SupervisedProcess\n"
        "p = SupervisedProcess(['bash', '-c', 'sleep 300 & exec sleep 301'], what='a stand-in server')\n"
        "p.start()\nprint('held', flush=True)\nprint(p.pid, flush=True)\ntime.sleep(300)\n"
    )
    assert owner.stdout is not None
    supervisor = int(owner.stdout.readline())
    deadline = time.monotonic() + 10
    while len(psutil.Process(supervisor).children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == supervisor and p.pid != supervisor]
    assert len(group) == 2
    # The owner and its supervisor die at once, outright: the servers they leave keep running...
    os.kill(supervisor, signal.SIGKILL)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    time.sleep(1.0)
    tracked = [(p, p.create_time()) for p in group]
    assert len(_alive(tracked)) == 2
    # ... until the next start reaps them from the pid file.
    reaped = reap_orphans()
    assert any(r["pgid"] == supervisor and r["what"] == "a stand-in server" for r in reaped)
    deadline = time.monotonic() + 10
    while _alive(tracked) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(tracked)


def test_a_stopped_scope_stops_its_own_servers_and_no_other() -> None:
    # An interrupted start ahead stops the server it was starting, never another server of
    # the process (CI once lost the test session's shared vLLM this way).
    import threading

    from flagrelease._supervise import ServerStopped, StopScope, SupervisedProcess

    bystander = SupervisedProcess(["sleep", "300"], stdout=subprocess.DEVNULL, what="another server")
    bystander.start()
    scope = StopScope("the test stopped it")
    mine: list[SupervisedProcess] = []

    def start_in_scope() -> None:
        with scope.entered():
            mine.append(SupervisedProcess(["sleep", "300"], stdout=subprocess.DEVNULL, what="my server"))
            mine[0].start()

    try:
        worker = threading.Thread(target=start_in_scope)
        worker.start()
        worker.join(10)
        time.sleep(1.0)  # the starting thread has ended: its server must outlive it
        assert mine and mine[0].exited() is None
        assert scope.stop(grace_s=1.0) == 1
        assert mine[0].exited() is not None
        assert bystander.exited() is None  # not in the scope: left running
        # A start after the stop is refused, and starts nothing.
        late = SupervisedProcess(["sleep", "300"], stdout=subprocess.DEVNULL, what="a late server")
        with scope.entered(), pytest.raises(ServerStopped, match="a late server was not started: the test stopped it"):
            late.start()
        assert late.pid is None
        # Outside the block, the thread's starts belong to no scope again.
        outside = SupervisedProcess(["true"], stdout=subprocess.DEVNULL, what="outside")
        outside.start()
        outside.stop(grace_s=1.0)
    finally:
        bystander.stop(grace_s=1.0)


def test_a_server_outlives_the_thread_that_started_it() -> None:
    # The kernel's parent-death signal fires when the forking *thread* ends; a server that a
    # pool's worker thread started must not die when the pool shuts down.
    from concurrent.futures import ThreadPoolExecutor

    from flagrelease._supervise import SupervisedProcess

    server = SupervisedProcess(["sleep", "300"], stdout=subprocess.DEVNULL, what="a pool's server")
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(server.start).result(timeout=30)
    try:
        time.sleep(1.5)  # the worker thread is gone
        assert server.exited() is None
    finally:
        server.stop(grace_s=1.0)
    assert server.exited() is not None


def test_a_start_interrupted_while_it_spawns_leaves_no_server() -> None:
    # Ctrl-C while the supervisor is being started: the owner never learns its pid, so the
    # spawn itself stops it once it exists.
    import threading

    from flagrelease import _supervise

    held = threading.Event()

    def hold_the_spawning_thread() -> subprocess.Popen[bytes]:
        held.wait(10)
        return subprocess.Popen(["true"])

    blocker = _supervise._spawn(hold_the_spawning_thread)
    seconds = f"{300 + os.getpid() % 1000 / 1000:.3f}"  # marks this test's command
    server = _supervise.SupervisedProcess(["sleep", seconds], stdout=subprocess.DEVNULL, what="an interrupted start")
    try:
        with interrupted_after(0.3):
            server.start()
    finally:
        held.set()
    blocker.result(timeout=10).wait()
    assert server.proc is None  # the owner never got it

    def left() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline"]) if seconds in (p.info["cmdline"] or [])]

    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left()  # neither the supervisor nor its command


def test_an_interrupted_thread_map_drops_the_calls_not_yet_started() -> None:
    # The hashing, verifying and probing pools: SIGTERM or Ctrl-C while 200 calls are queued
    # ends the map after the calls in flight, not after all 200.
    from flagrelease._threads import map_in_threads

    calls: Counter[str] = Counter()

    def slow(i: int) -> int:
        calls["started"] += 1
        time.sleep(0.1)
        return i

    assert map_in_threads(slow, range(6), workers=2, name="t") == list(range(6))
    calls.clear()
    with interrupted_after(0.35) as took:
        map_in_threads(slow, range(200), workers=2, name="t")
    assert took[0] < 2 and calls["started"] < 20, (took, calls)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


# -- heavy: a real run, killed while vLLM serves --------------------------------------------------
def _config(folder: Path, model: Path, name: str) -> tuple[Path, int]:
    port = free_port()
    data: dict[str, Any] = {
        "model": {"source": "local", "repo_id": "flagrelease/tiny-qwen2", "path": str(model)},
        "chip": "cpu",
        "convert": {"mode": "none"},
        "serve": {
            "engine_args": {
                "served_model_name": "tiny-kill",
                "max_model_len": 256,
                "max_num_seqs": 4,
                "dtype": "bfloat16",
                "enforce_eager": True,
                "port": port,
            },
            "flaggems": {"enabled": False},
            "health_timeout_s": 400,
            # Long enough that the run is always still serving when it is killed.
            "load_test": {"concurrency": [1], "requests_per_level": 1000, "max_tokens": 64, "timeout_s": 600},
        },
        "eval": {"reference": {"chip": "cpu"}},
        "work_dir": str(folder / "work"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, port


def _start(config: Path, *, prefect: bool, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    argv = [FLAGRELEASE, "run", str(config), "--stages", "fetch,convert,deploy"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*argv, *([] if prefect else ["--no-prefect"])],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_until(proc: subprocess.Popen[bytes], log: Path, what: str, ready: Any, timeout_s: float) -> None:
    """Poll ``ready()`` (False on an HTTP error) until it holds; fail if the run ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"no {what} within {timeout_s}s:\n{log.read_text()[-4000:]}")


def _wait_serving(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def healthy() -> bool:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200

    _wait_until(proc, log, "vLLM serving", healthy, 600)


def _wait_load_test(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until the deploy stage's load test is under way: the server has finished a few requests."""

    def under_way() -> bool:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2, trust_env=False).text
        done = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total")
        )
        return done >= 4  # the smoke request and at least three of the load test's 1000

    _wait_until(proc, log, "load test", under_way, 120)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize(
    ("prefect", "sig"),
    [(False, signal.SIGKILL), (False, signal.SIGTERM), (True, signal.SIGKILL), (True, signal.SIGTERM)],
    ids=["no-prefect-SIGKILL", "no-prefect-SIGTERM", "prefect-SIGKILL", "prefect-SIGTERM"],
)
def test_killed_run_leaves_no_process(
    prefect: bool, sig: signal.Signals, tiny_model: Path, serve_python: Path, tmp_path: Path
) -> None:
    name = f"kill-{'prefect' if prefect else 'plain'}-{sig.name.lower()}"
    config, port = _config(tmp_path / "release", tiny_model, name)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "run.log"
    proc = _start(config, prefect=prefect, env=env, log=log)
    try:
        _wait_serving(proc, port, log)
        tree = _tree(proc.pid)
        lines = [_describe(p) for p, _ in tree]
        assert any("VLLM" in line or "EngineCore" in line for line in lines), lines
        if prefect:
            assert any("prefect.server.api.server:create_app" in line for line in lines), lines
        if sig == signal.SIGKILL and not prefect:
            # One run per release: a second run of it refuses at once, naming this one.
            started = time.monotonic()
            second = subprocess.run(
                [FLAGRELEASE, "run", str(config), "--no-prefect", "--stages", "fetch,convert,deploy"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            COUNTS["second_tried"] += 1
            assert second.returncode == 2 and f"is in use by pid {proc.pid}" in second.stderr, second.stderr[-3000:]
            assert time.monotonic() - started < 15 and "Traceback" not in second.stderr
            COUNTS["second_refused"] += 1
        # Killed while the load test runs: the run must not wait for the rest of its requests.
        _wait_load_test(proc, port, log)
        tree = _tree(proc.pid)  # again: the engine may have started more processes meanwhile
        COUNTS["cases"] += 1
        COUNTS["processes"] += len(tree)
        killed = time.monotonic()
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tail = "\n".join(_describe(p) for p in _alive(tree))
            pytest.fail(f"{sig.name} did not end the run in 60s; still running:\n{tail}\n{log.read_text()[-4000:]}")
        took = time.monotonic() - killed
        if sig == signal.SIGTERM:
            COUNTS["sigterm_ms"] = max(COUNTS["sigterm_ms"], int(took * 1000))
            assert took < 10, f"SIGTERM took {took:.1f}s:\n{log.read_text()[-3000:]}"
        deadline = time.monotonic() + 20
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.25)
        left = _alive(tree)
        COUNTS["orphans"] += len(left)
        assert not left, f"left running after {sig.name}: {[_describe(p) for p in left]}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
