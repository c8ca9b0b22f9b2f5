"""The Prefect layer: deployments, the UI, served runs, caching and resume.

Everything runs against a real Prefect server (tests/fixtures_prefect.py) and the real
demo release (tests/fixtures_demo.py); nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from flagrelease.constants import REPO_ROOT
from tests.fixtures_demo import DemoRun
from tests.fixtures_prefect import PrefectServer
from tests.fixtures_s3 import S3Server

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow]


def _deployments(server: PrefectServer) -> dict[str, dict]:
    resp = server.api("POST", "/deployments/filter", json={"limit": 200})
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
    # One per top-level config, one per matrix pair (Iluvatar's pair is its own config's),
    # one per live reference on another chip, one per matrix.
    from flagrelease.matrix import load_matrix

    pairs = {p.deployment for p in load_matrix(REPO_ROOT / "release_configs" / "matrices" / "deepseek-r1.yaml").pairs}
    releases = {n for n, d in deployments.items() if "role:reference" not in d["tags"] and "matrix" not in d["tags"]}
    assert expected | pairs <= releases
    matrix = deployments["deepseek-r1"]
    assert matrix["work_pool_name"] == "flagrelease-matrix"
    assert matrix["parameters"] == {"matrix": "release_configs/matrices/deepseek-r1.yaml"}
    metax = deployments["deepseek-r1-metax-c550"]
    assert metax["work_pool_name"] == "metax-c550"
    assert metax["parameters"] == {"config": "release_configs/matrices/deepseek-r1.yaml#metax-c550"}
    # A chip's pool runs one release per node of the pool (the chip profile's nodes).
    pool = prefect_server.api("GET", "/work_pools/metax-c550").json()
    assert pool["concurrency_limit"] == 1
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
    # Each release's own page (the list pages through many deployments: the matrices' pairs too).
    for name in ("deepseek-r1-iluvatar", "deepseek-r1-distill-qwen-32b-nvidia", "demo-tiny-cpu"):
        found = prefect_server.api("GET", f"/deployments/name/flagrelease/{name}")
        page = f"{prefect_server.ui_url}/deployments/deployment/{found.json()['id']}"
        dom = subprocess.run(["chromium", *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
        assert name in dom.stdout, f"{name} not shown on {page}"
    url = f"{prefect_server.ui_url}/deployments"
    shot = tmp_path / "deployments.png"
    subprocess.run(
        ["chromium", *flags, "--window-size=1400,900", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    assert shot.stat().st_size > 10_000


def _wait_for_run(server: PrefectServer, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = server.api("GET", f"/flow_runs/{run_id}").json()
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
    # Reused stages still publish their artifacts, saying what this run did: nothing.
    publish = _latest_artifact(prefect_server, "demo-tiny-cpu-publish")
    assert "(reused)" in publish and "uploaded nothing" in publish, publish
    assert "(reused)" in _latest_artifact(prefect_server, "demo-tiny-cpu-eval")


def _artifact(server: PrefectServer, key: str) -> dict:
    """The latest artifact of ``key``."""
    resp = server.api(
        "POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    )
    (artifact,) = resp.json()
    return dict(artifact)


def _latest_artifact(server: PrefectServer, key: str) -> str:
    return str(_artifact(server, key)["data"])


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


def test_the_image_ran_beside_the_fetch_and_the_convert(demo_run: DemoRun) -> None:
    """The image needs no stage: the flow starts it at once, so it does not wait for the convert to end."""
    assert demo_run.state("image")["started_at"] < demo_run.state("convert")["finished_at"]
    assert demo_run.state("deploy")["started_at"] >= demo_run.state("convert")["finished_at"]


def test_stage_artifacts_are_published(demo_run: DemoRun, prefect_server: PrefectServer) -> None:
    resp = prefect_server.api("POST", "/artifacts/filter", json={"limit": 200})
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

    runs = prefect_server.api(
        "POST", "/flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["reference-of:demo-xref"]}}}
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


# -- one model across chips: the matrix flow, work pools, workers, limits ------------------------------
@dataclass
class MatrixSetup:
    """A matrix of the demo model on two CPU chips, deployed in their pools, a worker per pool.

    Attributes:
        root: the test's folder.
        configs: the config folder: the demo (a copy of its config) and ``matrices/tiny.yaml``.
        env: the environment of every command and worker.
        bucket: the S3 bucket (moto) the collection is published to, below ``tiny/``.
    """

    root: Path
    configs: Path
    env: dict[str, str]
    bucket: str

    @property
    def publish(self) -> Path:
        return self.root / "publish"

    def state(self, work: str, stage: str) -> dict:
        return json.loads((self.root / work / "state" / f"{stage}.json").read_text())


def _start(name: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", name], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(line.split("UUID:")[1].strip() for line in proc.stdout.splitlines() if "UUID:" in line)


def _when(stamp: str) -> datetime:
    """A timestamp of Prefect's API, as a datetime (its strings vary in precision: never compare them)."""
    return datetime.fromisoformat(stamp)


def _flow_runs(server: PrefectServer, tag: str) -> list[dict]:
    resp = server.api("POST", "/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [tag]}}, "limit": 50})
    return list(resp.json())


@pytest.fixture(scope="module")
def matrix_setup(
    demo_run: DemoRun, prefect_server: PrefectServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MatrixSetup]:
    """``flagrelease deploy`` of the matrix, and a worker on each of the pools cpu, cpu-b and the matrix's.

    The ``cpu`` pair is the demo itself under another name (its work folder a copy of the
    demo's, so only its card and publish run); the ``cpu-b`` pair, on a second CPU chip
    profile in its own pool, is released for real, cheaply: the multiple-choice task
    only, the demo's reference run as a stored reference, no FlagGems on/off comparison.
    """
    from flagrelease.constants import runtimes_dir
    from tests._chips import templates_with_chip

    root = tmp_path_factory.mktemp("matrix")
    templates = templates_with_chip(
        root / "templates", "cpu-b", work_pool="cpu-b", card_name="CPU-B", display_name="Second x86-64 CPU"
    )
    configs = root / "configs"
    (configs / "matrices").mkdir(parents=True)
    shutil.copy(demo_run.config, configs / demo_run.config.name)
    shutil.copytree(demo_run.work, root / "work-cpu", symlinks=True)
    base = yaml.safe_load(demo_run.config.read_text())
    for key in ("chip", "work_dir", "publish"):
        base.pop(key)
    bucket = s3_server.create_bucket("matrix-releases")
    matrix = {
        "description": "The demo model on two CPU chips.",
        "release": base,
        "chips": {
            "cpu": {"work_dir": str(root / "work-cpu"), "publish": {"local_dir": str(root / "publish" / "{chip}")}},
            "cpu-b": {
                "work_dir": str(root / "work-b"),
                "publish": {"local_dir": str(root / "publish" / "{chip}")},
                "serve": {"load_test": {"concurrency": [1], "requests_per_level": 2, "max_tokens": 4}},
                "eval": {
                    "tasks": [
                        {
                            "name": "tinyarith_mc",
                            "label": "TinyArith-MC (Acc.)",
                            "metric": "acc",
                            "kind": "loglikelihood",
                        }
                    ],
                    "reference": {
                        "mode": "stored",
                        "results_dir": str(demo_run.work / "bundle" / "eval" / "reference"),
                    },
                },
                "gates": {"flaggems_compare": False},
            },
        },
        "collection": {
            "work_dir": str(root / "collection"),
            "publish": {
                "local_dir": str(root / "publish"),
                "s3": {"bucket": bucket, "prefix": "tiny", "endpoint_url": s3_server.endpoint_url},
            },
        },
        "work_pool": "matrix-control",
    }
    (configs / "matrices" / "tiny.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    env = prefect_server.env(
        FLAGRELEASE_TEMPLATES=str(templates),
        FLAGRELEASE_HOME=str(root / "home"),
        FLAGRELEASE_RUNTIMES=os.environ.get("FLAGRELEASE_RUNTIMES") or str(runtimes_dir()),
        AWS_ACCESS_KEY_ID="matrix-test-key-id",
        AWS_SECRET_ACCESS_KEY="matrix-test-secret-key",
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    proc = subprocess.run(
        [str(BIN / "flagrelease"), "deploy", "--config-dir", str(configs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (
        "flagrelease/tiny-cpu",
        "flagrelease/tiny-cpu-b",
        "flagrelease/demo-tiny-cpu",
        "flagrelease-matrix/tiny",
    ):
        assert name in proc.stdout, proc.stdout
    workers = []
    try:
        for pool in ("cpu", "cpu-b", "matrix-control"):
            with open(root / f"worker-{pool}.log", "wb") as log:
                workers.append(
                    subprocess.Popen(
                        [str(BIN / "prefect"), "worker", "start", "--pool", pool],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield MatrixSetup(root=root, configs=configs, env=env, bucket=bucket)
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGINT)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)


def _dom(url: str, tmp_path: Path, shot: Path) -> str:
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
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run(
        ["chromium", *flags, "--window-size=1400,900", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    return dom


def test_matrix_runs_each_pair_on_its_pool_and_publishes_the_support_table(
    matrix_setup: MatrixSetup, demo_run: DemoRun, prefect_server: PrefectServer, s3_server: S3Server, tmp_path: Path
) -> None:
    """`prefect deployment run flagrelease-matrix/tiny`: both pairs on their pools, at once; then the collection."""
    m = matrix_setup
    run = _wait_for_run(prefect_server, _start("flagrelease-matrix/tiny", m.env), timeout=1500)
    assert run["state"]["type"] == "COMPLETED", (
        run["state"],
        (m.root / "worker-matrix-control.log").read_text()[-4000:],
    )
    runs = [r for r in _flow_runs(prefect_server, "matrix:tiny") if r["id"] != run["id"]]
    seen = [
        (r["work_pool_name"], r["name"], r["state"]["type"], r["created"], r["start_time"], r["end_time"]) for r in runs
    ]
    pairs = {r["work_pool_name"]: r for r in runs}
    assert set(pairs) == {"cpu", "cpu-b"}, seen
    assert all(r["state"]["type"] == "COMPLETED" and r["parent_task_run_id"] for r in pairs.values()), seen
    # Started at once: the matrix created each pair's run before the other pair's run ended.  (Not
    # "each began before the other ended": the cached cpu pair may finish before the cpu-b pool's
    # worker next polls.)
    a, b = ({k: _when(r[k]) for k in ("created", "end_time")} for r in (pairs["cpu"], pairs["cpu-b"]))
    assert a["created"] < b["end_time"] and b["created"] < a["end_time"], seen
    # The cpu pair is the demo under another name: everything up to its card was reused.
    for stage in ("fetch", "convert", "deploy", "eval", "gate"):
        assert m.state("work-cpu", stage)["finished_at"] == demo_run.state(stage)["finished_at"], stage

    table = json.loads((m.publish / "support.json").read_text())
    rows = {r["chip"]: r for r in table["rows"]}
    assert list(rows) == ["cpu", "cpu-b"] and table["counts"]["failed"] == 0
    cpu, cpu_b = rows["cpu"], rows["cpu-b"]
    assert cpu["status"] in ("released", "gate-failed") and cpu["verdict"] in ("consistent", "inconclusive")
    assert set(cpu["scores"]) == {"tinyarith", "tinyarith_mc"} and cpu["scores"]["tinyarith"]["score"] >= 50
    assert cpu["throughput"] and cpu["throughput"]["ratio"] > 0
    lo, hi = cpu["throughput"]["ci"]  # the gate's interval of the FlagGems on/off ratio
    assert 0 < lo <= hi
    assert (cpu["bundle_url"], cpu_b["bundle_url"]) == ("cpu/", "cpu-b/")
    assert (m.publish / "cpu" / "flagrelease.json").is_file() and (m.publish / "cpu-b" / "README.md").is_file()
    assert set(cpu_b["scores"]) == {"tinyarith_mc"} and cpu_b["scores"]["tinyarith_mc"]["score"] >= 50
    assert cpu_b["scores"]["tinyarith_mc"]["reference"] == cpu["scores"]["tinyarith_mc"]["reference"]
    assert "CPU-B" in cpu_b["label"] and cpu_b["throughput"] is None
    (ref,) = table["references"]
    assert ref["label"] == "Tiny-Qwen2-CPU"

    card = (m.publish / "README.md").read_text()
    bench = card.split("## Benchmark Result", 1)[1].strip().splitlines()
    header = [c.strip() for c in bench[0].strip("|").split("|")]
    assert header == ["Metrics", "Tiny-Qwen2-CPU", cpu["label"], cpu_b["label"]]
    arith = next([c.strip() for c in line.strip("|").split("|")] for line in bench if "TinyArith (EM)" in line)
    assert arith[3] == "n/a"  # the cpu-b release runs the multiple-choice task only
    mc = next([c.strip() for c in line.strip("|").split("|")] for line in bench if "TinyArith-MC" in line)
    assert mc[1] == f"{ref['scores']['tinyarith_mc']:.2f}" and mc[3].startswith(
        f"{cpu_b['scores']['tinyarith_mc']['score']:.2f}"
    )
    assert "| Second x86-64 CPU " in card and str(m.root) not in card
    s3 = s3_server.client(aws_access_key_id="matrix-test-key-id", aws_secret_access_key="matrix-test-secret-key")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=m.bucket, Prefix="tiny/")["Contents"]}
    assert keys == {"tiny/README.md", "tiny/support.json", "tiny/support.schema.json"}
    body = s3.get_object(Bucket=m.bucket, Key="tiny/README.md")["Body"].read().decode()
    assert body == card

    support = _artifact(prefect_server, "matrix-tiny-support")
    assert support["type"] == "table" and "Second x86-64 CPU" in str(support["data"])
    summary = _latest_artifact(prefect_server, "matrix-tiny")
    assert "| Second x86-64 CPU | tiny-cpu-b | COMPLETED | released |" in summary
    limits = prefect_server.api("POST", "/v2/concurrency_limits/filter", json={}).json()
    host = next(lim for lim in limits if lim["name"].startswith("flagrelease-host-"))
    assert host["limit"] == 1 and host["active_slots"] == 0

    # The UI shows the matrix run with its two pair runs.
    shot = tmp_path / "matrix-run.png"
    dom = _dom(f"{prefect_server.ui_url}/runs/flow-run/{run['id']}", tmp_path, shot)
    assert run["name"] in dom and "flagrelease-matrix" in dom, dom[-2000:]
    assert shot.stat().st_size > 10_000

    # Run again: every pair is finished and current, so no stage of either does any work.
    before = {s: m.state("work-b", s)["finished_at"] for s in ("fetch", "convert", "deploy", "eval", "gate", "card")}
    again = _wait_for_run(prefect_server, _start("flagrelease-matrix/tiny", m.env), timeout=900)
    assert again["state"]["type"] == "COMPLETED", again["state"]
    assert {s: m.state("work-b", s)["finished_at"] for s in before} == before
    again_rows = json.loads((m.publish / "support.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if k != "run"} for r in again_rows] == [
        {k: v for k, v in r.items() if k != "run"} for r in table["rows"]
    ]


def test_a_pool_limit_of_one_serialises_two_releases_on_the_pool(
    matrix_setup: MatrixSetup, prefect_server: PrefectServer
) -> None:
    """Two releases in the cpu pool (its profile: one node), started together: one runs after the other."""
    m = matrix_setup
    pool = prefect_server.api("GET", "/work_pools/cpu").json()
    assert pool["concurrency_limit"] == 1
    ids = [_start(name, m.env) for name in ("flagrelease/demo-tiny-cpu", "flagrelease/tiny-cpu")]
    runs = sorted((_wait_for_run(prefect_server, i, timeout=900) for i in ids), key=lambda r: _when(r["start_time"]))
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
    first, second = runs
    assert _when(first["end_time"]) <= _when(second["start_time"]), (first["end_time"], second["start_time"])
