"""The Prefect layer: deployments, the UI, served runs, caching and resume.

Everything runs against a real Prefect server (tests/fixtures_prefect.py) and the real
demo release (tests/fixtures_demo.py); nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from flagrelease.constants import REPO_ROOT
from tests.fixtures_demo import DemoRun
from tests.fixtures_prefect import PrefectServer

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow]


def _deployments(server: PrefectServer) -> dict[str, dict]:
    resp = httpx.post(f"{server.api_url}/deployments/filter", json={"limit": 200}, timeout=30)
    resp.raise_for_status()
    return {d["name"]: d for d in resp.json()}


def test_library_never_imports_prefect() -> None:
    code = (
        "import sys, pkgutil, importlib, flagrelease\n"
        "for m in pkgutil.walk_packages(flagrelease.__path__, 'flagrelease.'):\n"
        "    if m.name.endswith('vllm_plugin'): continue\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_deploy_registers_one_deployment_per_config_in_the_chips_pool(prefect_server: PrefectServer) -> None:
    proc = subprocess.run(
        [str(BIN / "flagrelease"), "deploy"], env=prefect_server.env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deployments = _deployments(prefect_server)
    expected = {p.stem for p in (REPO_ROOT / "release_configs").glob("*.yaml")}
    assert expected <= set(deployments)
    iluvatar = deployments["deepseek-r1-iluvatar"]
    assert iluvatar["work_pool_name"] == "iluvatar-bi-v150"
    assert "chip:iluvatar-bi-v150" in iluvatar["tags"]
    assert iluvatar["parameters"] == {"config": "release_configs/deepseek-r1-iluvatar.yaml"}
    assert deployments["deepseek-r1-distill-qwen-32b-nvidia"]["work_pool_name"] == "nvidia-h100"


def test_deployments_show_in_the_prefect_ui(prefect_server: PrefectServer, tmp_path: Path) -> None:
    subprocess.run(
        [str(BIN / "flagrelease"), "deploy"], env=prefect_server.env(), check=True, capture_output=True, timeout=300
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=20000",
    ]
    url = f"{prefect_server.ui_url}/deployments"
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    for name in ("deepseek-r1-iluvatar", "deepseek-r1-distill-qwen-32b-nvidia", "demo-tiny-cpu"):
        assert name in dom, f"{name} not shown on {url}"
    shot = tmp_path / "deployments.png"
    subprocess.run(
        ["chromium", *flags, "--window-size=1400,900", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    assert shot.stat().st_size > 10_000


def _wait_for_run(server: PrefectServer, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=30).json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def _served_run(
    server: PrefectServer, config_dir: Path, deployment: str, *, ready: Callable[[dict[str, dict]], bool], env: dict
) -> dict:
    """Serve ``config_dir`` (``flagrelease serve``), run ``flagrelease/<deployment>``, return the finished run.

    ``ready`` says when the served deployments are registered; the serving process is
    stopped (its whole process group) whatever happens.
    """
    serve = subprocess.Popen(
        [str(BIN / "flagrelease"), "serve", "--config-dir", str(config_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready(_deployments(server)):
            assert serve.poll() is None, serve.stdout.read().decode() if serve.stdout else ""
            assert time.monotonic() < deadline, "served deployments never registered"
            time.sleep(1)
        proc = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", f"flagrelease/{deployment}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run_id = next(line.split("UUID:")[1].strip() for line in proc.stdout.splitlines() if "UUID:" in line)
        return _wait_for_run(server, run_id, timeout=1200)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


def test_served_deployment_run_reaches_completed(demo_run: DemoRun, prefect_server: PrefectServer) -> None:
    """`flagrelease serve` + `prefect deployment run flagrelease/demo-tiny-cpu`, reusing the demo's work.

    The worker deployments are registered first (`flagrelease deploy`): serving takes
    them over (a served update of a worker deployment would crash at start in Prefect).
    """
    subprocess.run(
        [str(BIN / "flagrelease"), "deploy"], env=prefect_server.env(), check=True, capture_output=True, timeout=300
    )
    assert _deployments(prefect_server)["demo-tiny-cpu"]["work_pool_name"] == "cpu"
    run = _served_run(
        prefect_server,
        demo_run.config.parent,
        "demo-tiny-cpu",
        ready=lambda d: "demo-tiny-cpu" in d and d["demo-tiny-cpu"]["parameters"]["config"] == str(demo_run.config),
        env=prefect_server.env(),
    )
    assert run["state"]["type"] == "COMPLETED", run["state"]
    # Nothing changed since the demo, so no stage did any work: every result is the demo's.
    for stage in ("fetch", "convert", "deploy", "eval"):
        assert (
            demo_run.state(stage)["finished_at"]
            == json.loads((demo_run.work / "state" / f"{stage}.json").read_text())["finished_at"]
        )


def test_rerun_with_nothing_changed_does_no_stage_work(demo_run: DemoRun, prefect_server: PrefectServer) -> None:
    before = {s: demo_run.state(s)["finished_at"] for s in ("fetch", "convert", "deploy", "eval", "gate", "card")}
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "flagrelease"), "run", str(demo_run.config)],
        env=prefect_server.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = {s: demo_run.state(s)["finished_at"] for s in before}
    assert after == before
    assert time.monotonic() - started < 240, "a cached re-run must not serve or evaluate again"


def test_failed_run_resumes_at_the_failed_stage(
    demo_run: DemoRun, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """Break publishing (its folder is a file), run, fix, run again: only publish re-runs."""
    blocker = tmp_path / "publish-here"
    blocker.write_text("a file where the publish folder should be")
    data = yaml.safe_load(demo_run.config.read_text())
    data["publish"]["local_dir"] = str(blocker)
    broken = tmp_path / "configs" / "demo-tiny-cpu.yaml"
    broken.parent.mkdir()
    broken.write_text(yaml.safe_dump(data))
    before = {s: demo_run.state(s)["finished_at"] for s in ("fetch", "convert", "deploy", "eval", "gate")}
    proc = subprocess.run(
        [str(BIN / "flagrelease"), "run", str(broken)],
        env=prefect_server.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "publish" in (proc.stdout + proc.stderr)
    blocker.unlink()
    proc = subprocess.run(
        [str(BIN / "flagrelease"), "run", str(broken)],
        env=prefect_server.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (blocker / "README.md").is_file()
    after = {s: demo_run.state(s)["finished_at"] for s in before}
    assert after == before, "stages before the failed one must not run again"


def test_stage_artifacts_are_published(demo_run: DemoRun, prefect_server: PrefectServer) -> None:
    resp = httpx.post(f"{prefect_server.api_url}/artifacts/filter", json={"limit": 200}, timeout=30)
    keys = {a.get("key") for a in resp.json()}
    for stage in ("fetch", "convert", "image", "deploy", "eval", "gate", "card", "publish"):
        assert f"demo-tiny-cpu-{stage}" in keys, stage
    assert "demo-tiny-cpu-convert-quantization" in keys
    types = {a["type"] for a in resp.json()}
    assert {"markdown", "table", "progress"} <= types


def test_live_reference_on_another_chip_runs_on_its_pool(
    demo_run: DemoRun, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """A release on ``cpu`` whose reference is live on ``cpu-ref``: a second CPU profile with its own pool.

    ``flagrelease serve`` serves ``demo-xref`` and ``demo-xref-reference``; running the first
    starts the second before its eval (the reference side: fetch, image, eval of the BF16
    weights on cpu-ref), waits for it, and gates against the run it handed over.
    """
    from tests._chips import templates_with_chip
    from tests.fixtures_demo import write_demo_config

    templates = templates_with_chip(
        tmp_path / "templates", "cpu-ref", work_pool="cpu-ref", card_name="CPU-REF", display_name="Reference CPU"
    )
    exchange = tmp_path / "exchange"
    config = write_demo_config(
        tmp_path / "configs",
        tmp_path,
        name="demo-xref",
        model__path=str(demo_run.root / "tiny-qwen2"),
        image__build=False,
        eval__tasks=[
            {"name": "tinyarith_mc", "label": "TinyArith-MC (Acc.)", "metric": "acc", "kind": "loglikelihood"}
        ],
        eval__reference={"chip": "cpu-ref", "mode": "live", "weights": "source", "results_dir": str(exchange)},
        gates__flaggems_compare=False,
    )
    env = prefect_server.env(FLAGRELEASE_TEMPLATES=str(templates))
    specs = subprocess.run(
        [str(BIN / "flagrelease"), "plan", str(config)], env=env, capture_output=True, text=True, timeout=120
    )
    assert "flagrelease/demo-xref-reference" in specs.stdout, specs.stdout + specs.stderr
    run = _served_run(
        prefect_server,
        config.parent,
        "demo-xref",
        ready=lambda d: {"demo-xref", "demo-xref-reference"} <= set(d),
        env=env,
    )
    assert run["state"]["type"] == "COMPLETED", run["state"]
    reference = _deployments(prefect_server)["demo-xref-reference"]
    assert reference["parameters"]["options"] == {"role": "reference"}
    assert "role:reference" in reference["tags"] and "pool:cpu-ref" in reference["tags"]

    runs = httpx.post(
        f"{prefect_server.api_url}/flow_runs/filter",
        json={"flow_runs": {"tags": {"all_": ["reference-of:demo-xref"]}}},
        timeout=30,
    ).json()
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]
    key = json.loads((exchange / "flagrelease-reference.json").read_text())
    assert key["chip"] == "cpu-ref" and list(exchange.rglob("samples_tinyarith_mc*.jsonl"))
    side = json.loads((tmp_path / "work" / "reference" / "state" / "eval.json").read_text())
    assert list(side["outputs"]["variants"]) == ["reference"]
    work = tmp_path / "work"
    scores = json.loads((work / "bundle" / "eval" / "reference" / "scores.json").read_text())
    assert scores["stored_from"] == str(exchange)
    gate = json.loads((work / "bundle" / "reports" / "gate_results.json").read_text())
    assert gate["reference"] == {"label": "Tiny-Qwen2-CPU-REF", "chip": "cpu-ref"}
    assert gate["rows"][0]["n_items"] >= 50 and gate["rows"][0]["reference"] is not None
