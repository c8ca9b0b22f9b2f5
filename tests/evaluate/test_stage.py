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
        yield _Endpoint(f"{url}/v1", f"model-{variant}")

    def load_test(root: str, *, model_name: str, settings: Any) -> list[dict[str, Any]]:
        loads.append(model_name)
        tok = 90.0 if "throughput" in model_name and "off" not in model_name else 100.0
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
    # Each variant served once for its eval; then FlagGems on and off side by side for the trials.
    assert [(s["variant"], s["flaggems"]) for s in served] == [
        ("target", True),
        ("target_gems_off", False),
        ("target-throughput", True),
        ("target_gems_off-throughput", False),
    ]
    assert served[2]["model_dir"] == served[3]["model_dir"] == str(tmp_path / "int8")
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
    assert loads.count("model-target-throughput") == 1 + 4  # the warm-up, then four trials
    assert loads.count("model-target") == 0
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

    real = ctx.hooks["serving"]

    @contextlib.contextmanager
    def serving(cfg: Any, *, variant: str, **kw: Any) -> Iterator[Any]:
        handler.mode = "rambling" if variant == "target" else "fine"
        with real(cfg, variant=variant, **kw) as endpoint:
            yield endpoint

    ctx.hooks["serving"] = serving
    result = ev.run_stage(ctx)
    out = EvalOutputs.model_validate(result.outputs)
    target = out.variants["target"]
    assert target.error_kind == "truncated" and target.dir is None and "truncation probe" in str(target.error)
    assert target.probes is not None and target.probes["truncation"]["share"] == 1.0
    assert out.variants["target_gems_off"].scores == {"tinyarith": 0.0}
    assert out.throughput is None  # nothing to time against a broken target
    assert result.status == "warning" and "failed the truncation probe" in result.summary
    # Without FlagGems off to compare with, the same failure stops the eval.
    handler.mode = "rambling"
    alone = _ctx(tmp_path / "alone", url, [], [], gates__flaggems_compare=False)
    alone.hooks["serving"] = serving
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
