"""Tests of the FlagGems operator probe (flagrelease/gems/probe.py and its worker, flagrelease/gems/_probe_*.py).

No machine here has a GPU: the real FlagGems path is checked for its clear ``skipped``
verdict, and the whole probe (worker processes, logit comparison, crash and hang
isolation, verdicts, the bundle report) runs end to end on the CPU with the stand-in
operator library of ``tests/_probe_standin.py``.  The ``gpu`` test runs the real thing.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flagrelease.cli import main
from flagrelease.config import ReleaseConfig, parse_release
from flagrelease.convert.outputs import ConvertOutputs
from flagrelease.fetch.outputs import FetchOutputs
from flagrelease.gems import (
    TINY_QWEN2_CONFIG,
    OpResult,
    ProbeReport,
    Tolerances,
    kernel_stats,
    looks_like_triton_kernel,
    probe_gems,
    run_isolated,
    run_probe_step,
)
from flagrelease.gems._probe_step import _step_weights
from flagrelease.pipeline import ReleaseContext, StageResult

REPO = Path(__file__).resolve().parents[2]
STANDIN = "tests._probe_standin:StandInOps"
SMALL_BENCH = {"prefill_len": 32, "decode_batch": 2, "decode_ctx": 16, "decode_steps": 4, "repeats": 3}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def _release(tmp_path: Path, **extra: object) -> ReleaseConfig:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({**TINY_QWEN2_CONFIG, "vocab_size": 512}))
    data = {
        "name": "probe-test",
        "model": {"source": "local", "repo_id": "test/tiny", "path": str(model_dir)},
        "chip": "cpu",
        "work_dir": str(tmp_path / "work"),
        **extra,
    }
    return parse_release(data, path=tmp_path / "probe-test.yaml")


# -- isolation ------------------------------------------------------------------------------
def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_run_isolated_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    argv = _script(
        tmp_path,
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("hanging now", flush=True)
        time.sleep(600)
        """,
    )
    t0 = time.monotonic()
    run = run_isolated(argv, timeout_s=3, log_path=tmp_path / "log.txt")
    assert run.status == "timeout" and run.returncode is None
    assert time.monotonic() - t0 < 30
    assert "hanging now" in run.tail
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker's child outlived the timeout")


@pytest.mark.parametrize(
    ("body", "status", "rc"),
    [
        ("import os; print('about to fault', flush=True); os.abort()", "crash", -6),
        ("import sys; print('bad input', flush=True); sys.exit(3)", "error", 3),
        ("print('fine')", "ok", 0),
    ],
)
def test_run_isolated_reports_how_the_process_ended(tmp_path: Path, body: str, status: str, rc: int) -> None:
    run = run_isolated(_script(tmp_path, body), timeout_s=60, log_path=tmp_path / "log.txt")
    assert (run.status, run.returncode) == (status, rc)
    assert run.tail.splitlines()[0] in ("about to fault", "bad input", "fine")
    assert Path(run.log).is_file()


def test_run_isolated_redacts_secrets_in_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    run = run_isolated(
        _script(tmp_path, "import os; print(os.environ['HF_TOKEN'])"), timeout_s=60, log_path=tmp_path / "l.txt"
    )
    assert "hf_supersecretvalue123" not in run.tail


# -- pure pieces ------------------------------------------------------------------------------
def _trace() -> dict:
    ev = []
    kernels = [
        ("mm_kernel_general", 100.0, "cuLaunchKernelEx"),
        ("mm_kernel_general", 100.0, "cuLaunchKernelEx"),
        ("nvjet_tst_128x256_64x4", 300.0, "cudaLaunchKernel"),
        ("void at::native::vectorized_elementwise_kernel<4>(int)", 50.0, "cudaLaunchKernel"),
        ("_silu_kernel_rank_2", 50.0, "cuLaunchKernelEx"),
    ]
    for i, (name, dur, api) in enumerate(kernels):
        cat = "cuda_driver" if api.startswith("cuL") else "cuda_runtime"
        ev.append({"ph": "X", "cat": cat, "name": api, "dur": 2, "args": {"correlation": i}})
        ev.append({"ph": "X", "cat": "kernel", "name": name, "dur": dur, "args": {"correlation": i}})
    ev.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 999})
    return {"traceEvents": ev}


def test_kernel_stats_with_triton_names() -> None:
    stats = kernel_stats(_trace(), triton_names={"mm_kernel_general", "_silu_kernel_rank_2"})
    assert stats["kernels"] == 5 and stats["triton_kernels"] == 3
    assert stats["kernel_time_us"] == 600.0 and stats["triton_time_us"] == 250.0
    assert stats["triton_time_share"] == pytest.approx(250 / 600, abs=1e-4)
    assert stats["triton_launch_share"] == pytest.approx(0.6)
    assert stats["driver_api_launches"] == 3
    assert stats["classified_by"] == "triton-hooks"
    assert stats["top"][0]["name"].startswith("nvjet") and not stats["top"][0]["triton"]
    assert stats["top"][1] == {"name": "mm_kernel_general", "launches": 2, "time_us": 200.0, "triton": True}


def test_kernel_stats_falls_back_to_the_name_heuristic() -> None:
    stats = kernel_stats(_trace())
    assert stats["classified_by"] == "name-heuristic"
    assert stats["triton_kernels"] == 3
    assert looks_like_triton_kernel("add_func_kernel_rank_1")
    assert not looks_like_triton_kernel("sm90_xmma_gemm_bf16bf16_bf16f32")
    assert not looks_like_triton_kernel("void at::native::(anonymous namespace)::cat_kernel<float>()")
    assert kernel_stats({"traceEvents": []})["triton_time_share"] is None


def test_tolerances_follow_the_noise_floor() -> None:
    assert Tolerances.from_floor(None) == Tolerances(rel_l2=0.05, top1=0.9, source="default")
    tol = Tolerances.from_floor({"rel_l2_err": 0.01, "top1_agreement": 0.98})
    assert tol.rel_l2 == pytest.approx(0.04) and tol.top1 == pytest.approx(0.93)
    assert Tolerances.from_floor({"rel_l2_err": 0.0, "top1_agreement": 1.0}).rel_l2 == 1e-3


def test_report_round_trips_and_renders() -> None:
    report = ProbeReport(
        release="r",
        chip="nvidia-h100",
        verdict="warning",
        reason="1 operator(s) to exclude",
        tolerances={"rel_l2": 0.02, "top1": 0.95, "source": "default"},
        ops=[
            OpResult(
                op="mm",
                status="ok",
                calls=10,
                max_abs_err=0.01,
                max_rel_err=0.001,
                rel_l2_err=0.002,
                top1_agreement=1.0,
                nonfinite=0,
                seconds=3.0,
            ),
            OpResult(op="cos", status="timeout", seconds=120.0, detail="no result within 120s"),
        ],
        excluded_ops=["cos"],
    )
    again = ProbeReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    text = report.to_text()
    assert "| mm | ok | 10 | 1.00e-02 | 1.00e-03 | 2.00e-03 | 1.000 | 0 | 3.0 |" in text
    assert "| cos | timeout | - |" in text
    assert "- cos (timeout): no result within 120s" in text
    assert text.rstrip().endswith('excluded_ops: ["cos"]')


# -- no GPU: the real FlagGems path -------------------------------------------------------
@no_gpu
def test_no_gpu_gives_a_clear_skip(tmp_path: Path) -> None:
    cfg = _release(tmp_path)
    report = probe_gems(cfg, out_dir=tmp_path / "out")
    assert report.verdict == "skipped"
    assert "no GPU" in report.reason and "target chip" in report.reason
    saved = json.loads((tmp_path / "out" / "gems_probe.json").read_text())
    assert saved["verdict"] == "skipped" and saved["excluded_ops"] == []
    assert "verdict: **skipped** (no GPU" in (tmp_path / "out" / "gems_probe.md").read_text()


@no_gpu
def test_cli_probe_gems_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "release.yaml"
    cfg_path.write_text(
        (REPO / "release_configs" / "deepseek-r1-distill-qwen-32b-nvidia.yaml").read_text()
        + f"\nwork_dir: {tmp_path / 'work'}\n"
    )
    rc = main(["probe-gems", str(cfg_path), "--out", str(tmp_path / "out"), "--layers", "1"])
    assert rc == 0
    assert "verdict: **skipped**" in capsys.readouterr().out
    assert (tmp_path / "out" / "gems_probe.json").is_file()


@no_gpu
def test_probe_step_skips_cleanly_and_plans(tmp_path: Path) -> None:
    ctx = ReleaseContext.create(_release(tmp_path))
    plan = ReleaseContext.create(_release(tmp_path), dry_run=True)
    assert run_probe_step(plan).status == "skipped" and not (plan.layout.reports_dir / "gems_probe.json").exists()
    result = run_probe_step(ctx)
    assert result.status == "skipped" and result.outputs["verdict"] == "skipped"
    assert json.loads((ctx.layout.reports_dir / "gems_probe.json").read_text())["verdict"] == "skipped"
    off = ReleaseContext.create(_release(tmp_path, serve={"flaggems": {"enabled": False}}))
    assert "off" in run_probe_step(off).summary


def test_probe_step_probes_the_weights_upstream_stages_left(tmp_path: Path) -> None:
    def weights(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        return folder

    ctx = ReleaseContext.create(_release(tmp_path))
    assert _step_weights(ctx) is None  # nothing upstream ran: random weights
    fetched, converted = weights("fetched"), weights("converted")
    ctx.results["fetch"] = StageResult(stage="fetch", summary="", outputs=FetchOutputs(model_dir=str(fetched)))
    assert _step_weights(ctx) == fetched
    ctx.results["convert"] = StageResult(
        stage="convert", summary="", outputs=ConvertOutputs(model_dir=str(converted), mode="none")
    )
    assert _step_weights(ctx) == converted  # BF16 from convert comes first
    (converted / "model.safetensors").unlink()
    assert _step_weights(ctx) == fetched  # a folder without weights is passed over
    quantized = ReleaseContext.create(_release(tmp_path, convert={"mode": "int8-w8a8"}))
    quantized.results.update(ctx.results)
    (converted / "model.safetensors").write_bytes(b"")
    assert _step_weights(quantized) == fetched  # transformers cannot load INT8 compressed tensors


# -- the whole probe on the CPU stand-in -----------------------------------------------------
@pytest.mark.slow
def test_probe_end_to_end_with_the_cpu_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the workers import tests._probe_standin from here
    monkeypatch.setenv("FLAGRELEASE_TEST_HANG_OP", "cos")
    ctx = ReleaseContext.create(
        _release(tmp_path),
        probe_library=STANDIN,
        probe_timeout_s=40,
        probe_jobs=3,
        probe_bench=SMALL_BENCH,
    )
    result = run_probe_step(ctx)
    report = json.loads((ctx.layout.reports_dir / "gems_probe.json").read_text())
    status = {op["op"]: op["status"] for op in report["ops"]}
    assert status == {
        "cos": "timeout",
        "embedding": "crash",
        "mean_dim": "mismatch",
        "neg": "nan",
        "rsqrt": "ok",
        "silu": "ok",
    }
    assert report["excluded_ops"] == ["cos", "embedding", "mean_dim", "neg"]
    assert result.status == "warning" and result.outputs["excluded_ops"] == report["excluded_ops"]
    ops = {op["op"]: op for op in report["ops"]}
    assert ops["silu"]["calls"] == 2 * (1 + 4) and ops["silu"]["rel_l2_err"] <= report["tolerances"]["rel_l2"]
    assert ops["mean_dim"]["rel_l2_err"] > report["tolerances"]["rel_l2"]
    assert ops["neg"]["nonfinite"] > 0
    assert "SIGABRT" in ops["embedding"]["detail"]
    assert ops["silu"]["native_drift"] == 0.0
    assert report["tolerances"]["source"] == "bf16-vs-fp32 noise floor"
    assert report["model"]["random_weights"] and report["model"]["arch"]["num_hidden_layers"] == 2
    # an operator alone hung or crashed, so only the set to ship ran all together
    assert len(report["full"]) == 1
    shipped = report["full"][0]
    assert shipped["exclude"] == report["excluded_ops"] and shipped["verdict"] == "consistent"
    assert shipped["native"]["bench"]["prefill_ms"] > 0 and shipped["library"]["bench"]["decode_tok_s"] > 0
    text = (ctx.layout.reports_dir / "gems_probe.md").read_text()
    assert "| cos | timeout |" in text and "| all minus 4 excluded | consistent |" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_a_gpu_with_flag_gems(tmp_path: Path) -> None:
    pytest.importorskip("flag_gems")
    report = probe_gems(_release(tmp_path), out_dir=tmp_path / "out", timeout_s=300, bench=SMALL_BENCH)
    assert report.verdict in ("pass", "warning")
    assert report.ops and all(r.status != "error" for r in report.ops)
    prof = report.full[-1]["library"]["profile"]
    assert prof["triton_kernels"] > 0 and prof["triton_time_share"] > 0
