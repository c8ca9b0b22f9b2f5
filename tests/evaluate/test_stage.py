"""The eval stage end to end against a small real HTTP server, with the deploy stage's hooks replaced.

Real lm-eval, a real OpenAI-compatible server (tests/evaluate/test_eval.py's scripted
one, answering well); ``serving`` and ``load_test`` are the pipeline's hooks, given here
so that the stage's plumbing -- variants, probes, the interleaved throughput trials, the
typed outputs the gate reads -- runs in seconds.  Real vLLM: tests/evaluate/test_eval.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flagrelease import evaluate as ev
from flagrelease.config import load_release
from flagrelease.errors import EvalError
from flagrelease.evaluate.outputs import EvalOutputs
from flagrelease.pipeline import ReleaseContext, StageResult
from tests.evaluate.test_eval import _Endpoint, _Misbehaving, misbehaving  # noqa: F401
from tests.fixtures_demo import write_demo_config

TASK = {"name": "tinyarith", "label": "TinyArith (EM)", "metric": "exact_match"}


def _ctx(tmp_path: Path, url: str, served: list[dict[str, Any]], loads: list[str], **overrides: Any) -> ReleaseContext:
    """The demo release on the scripted server; its reference is published scores (nothing to serve)."""
    overrides.setdefault("eval__tasks", [TASK])
    tmp_path.mkdir(parents=True, exist_ok=True)
    scores = tmp_path / "h100.yaml"
    scores.write_text("label: Tiny-Qwen2-H100-CUDA\nscores:\n  tinyarith: {score: 10.0, n: 4}\n", encoding="utf-8")
    overrides.setdefault("eval__reference", {"chip": "nvidia-h100", "mode": "scores", "scores": str(scores)})
    cfg = load_release(write_demo_config(tmp_path / "cfg", tmp_path, eval__limit=4, **overrides))
    ctx = ReleaseContext.create(cfg)
    ctx.results["fetch"] = StageResult("fetch", "", outputs={"model_dir": str(tmp_path / "source")})
    ctx.results["convert"] = StageResult(
        "convert", "", outputs={"model_dir": str(tmp_path / "int8"), "mode": "int8-w8a8"}
    )

    @contextlib.contextmanager
    def serving(cfg: Any, *, variant: str, flaggems: bool, **kw: Any) -> Iterator[_Endpoint]:
        served.append({"variant": variant, "flaggems": flaggems, "model_dir": str(kw["model_dir"])})
        loads.append(f"start {variant}")
        try:
            yield _Endpoint(f"{url}/v1", f"model-{variant}")
        finally:
            loads.append(f"stop {variant}")

    def load_test(root: str, *, model_name: str, settings: Any) -> list[dict[str, Any]]:
        loads.append(model_name)
        tok = 90.0 if model_name.startswith("model-target") and "off" not in model_name else 100.0
        n = settings.requests_per_level
        return [{"output_tokens_per_s": tok, "requests": n, "ok": n, "output_tokens": n * 16, "duration_s": 1.0}]

    ctx.hooks.update(serving=serving, load_test=load_test)
    return ctx


def test_stage_probes_evaluates_and_runs_the_throughput_trials(
    misbehaving: tuple[str, type[_Misbehaving]],  # noqa: F811
    tmp_path: Path,
) -> None:
    url, handler = misbehaving
    handler.mode = "fine"
    served: list[dict[str, Any]] = []
    loads: list[str] = []
    ctx = _ctx(
        tmp_path,
        url,
        served,
        loads,
        gates__throughput={"trials": 4, "requests": 3, "warmup_requests": 2, "settle_s": 0},
    )
    result = ev.run_stage(ctx)
    out = EvalOutputs.model_validate(result.outputs)
    assert list(out.variants) == ["target", "reference", "target_gems_off"]
    # Each variant served once: for its eval, then (kept up) for the trials, FlagGems on and off side by side.
    assert [(s["variant"], s["flaggems"]) for s in served] == [("target", True), ("target_gems_off", False)]
    assert served[0]["model_dir"] == served[1]["model_dir"] == str(tmp_path / "int8")
    trials = [x for x in loads if x.startswith("model-")]
    assert (
        trials
        == ["model-target", "model-target_gems_off"]
        + [
            "model-target",
            "model-target_gems_off",
            "model-target_gems_off",
            "model-target",
        ]
        * 2
    )  # each warmed up, then four rounds alternating the order
    # Both servers stopped only after the last trial, and never during an eval of the other.
    assert loads.index("start target_gems_off") < loads.index("model-target") < loads.index("stop target")
    assert loads[-2:] == ["stop target_gems_off", "stop target"]
    ref = out.variants.pop("reference")
    assert ref.scores == {"tinyarith": 10.0} and ref.scores_file is not None and ref.dir is None
    assert ref.tasks["tinyarith"]["n_items"] == 4
    for name, v in out.variants.items():
        assert v.probes is not None and v.probes["truncation"]["share"] == 0.0, name
        assert v.truncated == {"answers": 4, "truncated": 0}
        assert v.scores["tinyarith"] == 0.0  # the scripted server always answers 7
    thr = out.throughput
    assert thr is not None and thr.servers == "both" and thr.arms == {"a": "target", "b": "target_gems_off"}
    assert [t.arm for t in thr.trials] == ["target", "target_gems_off", "target_gems_off", "target"] * 2
    assert [t.round for t in thr.trials] == [0, 0, 1, 1, 2, 2, 3, 3]
    # The two arms' tokens/s come from the trials, not from a level after their evals.
    assert out.variants["target"].throughput == 90.0 and out.variants["target_gems_off"].throughput == 100.0
    assert "Throughput trials (8)" in result.summary
    ctx.results["eval"] = result
    from flagrelease.gate import run_stage as gate

    verdict = gate(ctx)
    assert verdict.outputs["throughput_ok"] is True  # 0.9 against the demo's 0.5
    assert "over 4 rounds: pass" in verdict.summary and "(unpaired)" in verdict.summary


def test_a_flaggems_serve_that_fails_a_probe_is_a_finding(
    misbehaving: tuple[str, type[_Misbehaving]],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The FlagGems-on target rambles; FlagGems off is compared, so the gate judges it instead of the eval stopping."""
    url, handler = misbehaving
    handler.mode = "rambling"
    served: list[dict[str, Any]] = []
    ctx = _ctx(tmp_path, url, served, [])

    handler.mode, handler.modes = "fine", {"model-target": "rambling"}
    result = ev.run_stage(ctx)
    out = EvalOutputs.model_validate(result.outputs)
    target = out.variants["target"]
    assert target.error_kind == "truncated" and target.dir is None and "truncation probe" in str(target.error)
    assert target.probes is not None and target.probes["truncation"]["share"] == 1.0
    assert out.variants["target_gems_off"].scores == {"tinyarith": 0.0}
    assert out.throughput is None  # nothing to time against a broken target
    assert result.status == "warning" and "failed the truncation probe" in result.summary
    # Without FlagGems off to compare with, the same failure stops the eval.
    alone = _ctx(tmp_path / "alone", url, [], [], gates__flaggems_compare=False)
    with pytest.raises(EvalError, match="truncation probe"):
        ev.run_stage(alone)


def test_kernel_caches_are_cleaned_when_asked(tmp_path: Path) -> None:
    """Where the server's environment is prepared: here (local runtime) and in FlagScale's before_start (others)."""
    from flagrelease import render
    from flagrelease.runtime import CLEAN_KERNEL_CACHES_SHELL, clean_kernel_caches

    env = {"HOME": str(tmp_path / "home"), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    kept = tmp_path / "home" / ".flaggems" / "tuned.json"
    stale = [tmp_path / "triton" / "ab" / "k.so", tmp_path / "home" / ".flaggems" / "code_cache" / "mm.py"]
    for path in [*stale, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert clean_kernel_caches(env) == [tmp_path / "triton", tmp_path / "home" / ".flaggems" / "code_cache"]
    assert not any(p.exists() for p in stale) and kept.is_file()
    assert clean_kernel_caches(env) == []  # nothing left to remove
    on = load_release(
        write_demo_config(tmp_path / "on", tmp_path, serve__flaggems={"enabled": True, "clean_caches": True})
    )
    assert CLEAN_KERNEL_CACHES_SHELL in render.before_start(on)
    assert render.before_start(on).index("rm -rf") < render.before_start(on).index("USE_FLAGGEMS")
    off = load_release(write_demo_config(tmp_path / "off", tmp_path))
    assert "rm -rf" not in render.before_start(off)


def test_trials_raise_the_servers_scheduling_priority_and_restore_it() -> None:
    import os
    import subprocess

    from flagrelease.evaluate._throughput import _priority

    server = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a server in its own session
    group = Path(f"/proc/{server.pid}/autogroup")
    try:
        before = group.read_text()
        with _priority([server.pid, None]) as raised:
            assert raised is (os.geteuid() == 0)
            assert group.read_text().split()[-1] == ("-19" if raised else before.split()[-1])
        assert group.read_text() == before
        with _priority([]) as raised:
            assert raised is False
    finally:
        server.kill()
        server.wait()


def test_the_server_pool_starts_ahead_keeps_and_replaces_a_server_that_failed(tmp_path: Path) -> None:
    """What lets the next server start during an eval, the trials reuse the eval's servers, and a dead one restart."""
    events: list[str] = []
    ctx = _ctx(tmp_path, "http://127.0.0.1:9", [], events)
    target, gems_off = (p for p in ev.plan_variants(ctx) if p.name in ("target", "target_gems_off"))
    with ev.ServerPool(ctx) as pool:
        with pool.serve(target, keep=True) as first, pool.ahead(gems_off):
            assert events[0] == "start target"  # gems_off starts in the background meanwhile
        assert events == ["start target", "start target_gems_off"]  # the end of `ahead` waited for it
        with pool.serve(gems_off) as off:  # the one started ahead; not kept after the block
            assert off.model_name == "model-target_gems_off"
        assert events[-1] == "stop target_gems_off"
        with pool.serve(target, keep=True) as again:
            assert again is first  # the same running server, not a second start
        with pytest.raises(EvalError), pool.serve(target, keep=True):
            raise EvalError("the server stopped answering")
        assert events[-1] == "stop target"  # a server whose use failed is stopped ...
        with pool.serve(target, keep=True) as fresh:
            assert fresh is not first  # ... and the next use starts a fresh one
        assert events[-1] == "start target"
    assert events[-1] == "stop target" and events.count("start target") == events.count("stop target") == 2


def test_an_interrupted_eval_stops_the_server_starting_ahead_instead_of_waiting(tmp_path: Path) -> None:
    """SIGTERM or Ctrl-C during an eval: the next variant's server, still starting, is stopped at once."""
    import subprocess
    import time

    from flagrelease._supervise import SupervisedProcess
    from flagrelease.errors import DeployError

    events: list[str] = []
    ctx = _ctx(tmp_path, "http://127.0.0.1:9", [], events)
    target, gems_off = (p for p in ev.plan_variants(ctx) if p.name in ("target", "target_gems_off"))
    started: list[SupervisedProcess] = []

    @contextlib.contextmanager
    def never_ready(cfg: Any, *, variant: str, flaggems: bool, **kw: Any) -> Iterator[Any]:
        # A real supervised process that never answers, waited on as the deploy stage waits
        # for health: until it is ready (never) or gone.
        server = SupervisedProcess(["sleep", "300"], stdout=subprocess.DEVNULL, what=f"vLLM ({variant})")
        started.append(server)
        server.start()
        while server.exited() is None:
            time.sleep(0.05)
        server.stop()
        raise DeployError(f"the engine {server.exited()} before it was ready")
        yield  # pragma: no cover

    # A server of the same process that the pool did not start (another stage's, or the
    # test session's shared vLLM): the interruption must leave it running.
    bystander = SupervisedProcess(["sleep", "300"], stdout=subprocess.DEVNULL, what="another server")
    bystander.start()
    try:
        with ev.ServerPool(ctx) as pool, pool.serve(target, keep=True):
            ctx.hooks["serving"] = never_ready
            began = time.monotonic()
            with pytest.raises(KeyboardInterrupt), pool.ahead(gems_off):
                while not started or started[0].pid is None:
                    time.sleep(0.05)
                raise KeyboardInterrupt  # as the signal handler raises it in the main thread
            assert time.monotonic() - began < 10
            assert started[0].exited() is not None
        assert bystander.exited() is None
    finally:
        bystander.stop(grace_s=1.0)
