"""The throughput verdict: a ratio with a paired bootstrap interval over interleaved rounds.

Statistics on simulated machines (a load that drifts, trial noise) for the error rates;
the schedule of :func:`flagrelease.evaluate.measure_interleaved` with recorded calls; the
gate stage on eval outputs that carry trials.  Real vLLM runs are in
tests/evaluate/test_throughput.py and benchmarks/bench_gates.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flagrelease.config import ThroughputGate
from flagrelease.evaluate import Arm, measure_interleaved
from flagrelease.evaluate.outputs import ThroughputOutputs
from flagrelease.gate import throughput_verdict
from flagrelease.gate.stats import ratio_comparison


def _machine(n: int, ratio: float, rng: np.random.Generator, *, noise: float = 0.1, drift: float = 0.4) -> tuple:
    """Tokens/s of two arms over ``n`` rounds: a shared load per round, noise per trial."""
    load = np.exp(rng.normal(0, drift, n))
    a = 300 * ratio * load * np.exp(rng.normal(0, noise, n))
    b = 300 * load * np.exp(rng.normal(0, noise, n))
    return list(a), list(b)


def test_clear_cases() -> None:
    rng = np.random.default_rng(0)
    a, b = _machine(8, 1.0, rng, noise=0.02)
    ok = ratio_comparison(a, b=b, min_ratio=0.8)
    assert ok.verdict == "pass" and ok.ratio_ci[0] > 0.8 and ok.ratio_ci[0] < ok.ratio < ok.ratio_ci[1]
    a, b = _machine(8, 0.5, rng, noise=0.02)
    bad = ratio_comparison(a, b=b, min_ratio=0.8)
    assert bad.verdict == "fail" and bad.ratio_ci[1] < 0.8 and bad.p_below < 0.05
    a, b = _machine(8, 0.8, rng, noise=0.1)
    assert ratio_comparison(a, b=b, min_ratio=0.8).verdict == "inconclusive"
    # Same numbers, same seed, same answer; a paired drift alone changes nothing.
    assert ratio_comparison(a, b=b, min_ratio=0.8) == ratio_comparison(a, b=b, min_ratio=0.8)
    same = ratio_comparison([100.0, 50.0, 200.0], b=[100.0, 50.0, 200.0], min_ratio=0.9)
    assert same.ratio == 1.0 and same.verdict == "pass"


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="two or more"):
        ratio_comparison([1.0], b=[1.0], min_ratio=0.8)
    with pytest.raises(ValueError, match="two or more"):
        ratio_comparison([1.0, 2.0], b=[1.0], min_ratio=0.8)
    with pytest.raises(ValueError, match="positive"):
        ratio_comparison([1.0, 0.0], b=[1.0, 1.0], min_ratio=0.8)


def test_a_a_false_fails_stay_near_alpha_even_with_few_rounds() -> None:
    """A against itself, judged at the hardest threshold (1.0): a fail is a false fail.

    The interval is expanded for few rounds; a plain percentile bootstrap fails about
    twice as often as alpha with eight rounds.
    """
    rng = np.random.default_rng(3)
    sims, fails = 300, 0
    for i in range(sims):
        a, b = _machine(8, 1.0, rng, noise=0.15, drift=0.5)
        fails += ratio_comparison(a, b=b, min_ratio=1.0, resamples=1000, seed=i).verdict == "fail"
    assert fails / sims <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)


def test_a_planted_slowdown_is_caught() -> None:
    """A true ratio of 0.75 against a 0.9 minimum, 10 rounds with 5 % trial noise: failed every time."""
    rng = np.random.default_rng(4)
    verdicts = []
    for i in range(100):
        a, b = _machine(10, 0.75, rng, noise=0.05)
        verdicts.append(ratio_comparison(a, b=b, min_ratio=0.9, resamples=1000, seed=i).verdict)
    assert verdicts.count("fail") == 100


# -- the gate's verdict from the eval's trials --------------------------------------------------
def _trials(on: list[float], off: list[float], **extra: Any) -> ThroughputOutputs:
    trials = []
    for r, (x, y) in enumerate(zip(on, off, strict=True)):
        order = [("target", x), ("target_gems_off", y)] if r % 2 == 0 else [("target_gems_off", y), ("target", x)]
        for pos, (arm, tok) in enumerate(order):
            trials.append(
                {
                    "round": r,
                    "position": pos,
                    "arm": arm,
                    "tok_s": tok,
                    "requests": 8,
                    "ok": 8,
                    "output_tokens": 256,
                    "duration_s": 256 / tok if tok else 1.0,
                    "at_s": 2.0 * (2 * r + pos),
                }
            )
    return ThroughputOutputs.model_validate(
        {
            "arms": {"a": "target", "b": "target_gems_off"},
            "servers": "both",
            "settings": {"trials": len(on)},
            "trials": trials,
            **extra,
        }
    )


def test_throughput_verdict_records_every_trial() -> None:
    on = [210.0, 190.0, 205.0, 199.0, 201.0, 195.0]
    off = [200.0, 185.0, 210.0, 200.0, 198.0, 190.0]
    t = throughput_verdict(_trials(on, off, seconds=30.0), min_ratio=0.8, alpha=0.05, resamples=1000)
    assert t is not None
    assert t["verdict"] == "pass" and t["ok"] is True and t["rounds"] == 6
    assert t["gems_on_tok_s"] == round(float(np.mean(on)), 2) and t["ratio_ci"][0] > 0.8
    assert len(t["trials"]) == 12 and t["trials"][1]["arm"] == "target_gems_off" and t["trials"][2]["position"] == 0
    assert t["ci_level"] == 0.9 and t["seconds"] == 30.0 and "expanded percentile" in t["method"]
    assert t["ratio"] == pytest.approx(float(np.exp(np.mean(np.log(np.array(on) / np.array(off))))), abs=1e-3)
    json.dumps(t)
    slow = throughput_verdict(
        _trials([100.0] * 4, [200.0, 210.0, 190.0, 205.0]), min_ratio=0.8, alpha=0.05, resamples=500
    )
    assert slow is not None and (slow["verdict"], slow["ok"]) == ("fail", False)
    unsure = throughput_verdict(
        _trials([160.0, 120.0, 170.0, 150.0], [200.0, 100.0, 190.0, 200.0]), min_ratio=0.8, alpha=0.05, resamples=500
    )
    assert unsure is not None and (unsure["verdict"], unsure["ok"]) == ("inconclusive", None)
    # A round that lost a trial is left out; fewer than two complete rounds: no verdict.
    broken = _trials([210.0, 190.0], [200.0, 0.0])
    assert throughput_verdict(broken, min_ratio=0.8, alpha=0.05, resamples=500) is None


def _stage(tmp_path: Path, throughput: ThroughputOutputs | None, *, target_tok: float = 100.0) -> Any:
    from flagrelease.config import load_release
    from flagrelease.gate import run_stage
    from flagrelease.pipeline import ReleaseContext, StageResult
    from tests.fixtures_demo import write_demo_config
    from tests.gate.test_gate import write_run

    ref = write_run(tmp_path / "ref", "arith", [1.0] * 900 + [0.0] * 100)
    cfg = load_release(
        write_demo_config(
            tmp_path / "cfg",
            tmp_path,
            eval__tasks=[{"name": "arith", "label": "Arith (EM)", "metric": "exact_match"}],
            gates__throughput_min_ratio=0.8,
        )
    )
    ctx = ReleaseContext.create(cfg)
    variants = {
        name: {"dir": str(ref), "throughput": tok, "chip": "cpu"}
        for name, tok in (("target", target_tok), ("reference", None), ("target_gems_off", 100.0))
    }
    outputs: dict[str, Any] = {"variants": variants}
    if throughput is not None:
        outputs["throughput"] = throughput.model_dump(mode="json")
    ctx.results["eval"] = StageResult("eval", "", outputs=outputs)
    result = run_stage(ctx)
    return result, json.loads(Path(result.outputs["results"]).read_text())


def test_stage_judges_the_trials_not_the_single_numbers(tmp_path: Path) -> None:
    # The single post-eval numbers say 0.5 (a fail); the interleaved trials say about 1.
    trials = _trials([200.0, 180.0, 210.0, 190.0, 205.0, 199.0], [198.0, 185.0, 205.0, 195.0, 200.0, 197.0])
    result, data = _stage(tmp_path / "a", trials, target_tok=50.0)
    assert result.outputs["throughput_ok"] is True and result.status == "ok"
    thr = data["throughput"]
    assert thr["verdict"] == "pass" and len(thr["trials"]) == 12 and thr["ratio_ci"][0] > 0.8
    assert "rounds" in result.summary and "pass" in result.summary
    # Inconclusive: a warning, and nothing blocks the publish.
    unsure = _trials([160.0, 120.0, 170.0, 150.0], [200.0, 100.0, 190.0, 200.0])
    result, data = _stage(tmp_path / "b", unsure)
    assert (result.status, result.outputs["throughput_ok"], data["throughput"]["verdict"]) == (
        "warning",
        None,
        "inconclusive",
    )
    # A clear slowdown fails the gate.
    slow = _trials([100.0, 95.0, 104.0, 99.0], [200.0, 190.0, 210.0, 205.0])
    result, data = _stage(tmp_path / "c", slow)
    assert (result.status, result.outputs["throughput_ok"]) == ("failed", False)
    from flagrelease.bundle import gate_failure_reasons

    assert any("throughput" in r for r in gate_failure_reasons(data))


# -- the schedule ---------------------------------------------------------------------------------
@dataclass
class _Endpoint:
    base_url: str
    model_name: str = "m"


def test_interleaved_schedule_alternates_and_warms_up() -> None:
    calls: list[tuple[str, int]] = []
    served: list[str] = []

    def load(root: str, *, model_name: str, settings: Any) -> list[dict[str, Any]]:
        calls.append((root, settings.requests_per_level))
        assert settings.concurrency == [3] and settings.max_tokens == 16 and settings.prompt == "p"
        tok = 100.0 if root.endswith("a") else 80.0
        return [{"output_tokens_per_s": tok, "requests": 4, "ok": 4, "output_tokens": 64, "duration_s": 0.6}]

    def arm(name: str) -> Arm:
        @contextlib.contextmanager
        def serve() -> Iterator[_Endpoint]:
            served.append(name)
            yield _Endpoint(f"http://127.0.0.1:1/{name}")

        return Arm(name, serve)

    settings = ThroughputGate(trials=5, requests=4, max_tokens=16, warmup_requests=2, settle_s=0)
    out = measure_interleaved([arm("a"), arm("b")], settings=settings, concurrency=3, prompt="p", load_test=load)
    assert served == ["a", "b"]  # both served once, side by side
    assert calls[:2] == [("http://127.0.0.1:1/a", 2), ("http://127.0.0.1:1/b", 2)]  # warm-ups
    assert [t["arm"] for t in out["trials"]] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert [t["round"] for t in out["trials"]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert out["arms"] == {"a": "a", "b": "b"} and out["settings"]["concurrency"] == 3
    ThroughputOutputs.model_validate(out)
    served.clear()
    calls.clear()
    out = measure_interleaved(
        [arm("a"), arm("b")], settings=settings, concurrency=3, prompt="p", load_test=load, servers="alternate"
    )
    assert served == ["a", "b", "b", "a"]  # four servings, A B B A
    assert len(calls) == 4 + 12 and out["servers"] == "alternate"  # a warm-up each, then 6 rounds of two trials
    rounds = {(t["round"], t["arm"]) for t in out["trials"]}
    assert rounds == {(r, arm) for r in range(6) for arm in "ab"}
    assert [t["arm"] for t in out["trials"]] == ["a"] * 3 + ["b"] * 6 + ["a"] * 3


def test_the_card_shows_the_interval_and_every_trial(tmp_path: Path) -> None:
    from flagrelease.card import render_card_cli

    on = [200.0, 180.0, 210.0, 190.0, 205.0, 199.0]
    off = [198.0, 185.0, 205.0, 195.0, 200.0, 197.0]
    trials = _trials(on, off)
    result, data = _stage(tmp_path, trials)
    config = tmp_path / "cfg" / "demo-tiny-cpu.yaml"
    card = render_card_cli(config, results=Path(result.outputs["results"]), out_dir=tmp_path / "card")
    text = card.read_text()
    lo, hi = data["throughput"]["ratio_ci"]
    assert f"90% confidence interval [{lo:.2f}, {hi:.2f}]" in text
    assert "6 interleaved rounds" in text and "**pass**" in text
    assert "| Round |" in text
    for r, (x, y) in enumerate(zip(on, off, strict=True)):
        assert f"| {r + 1} | {x:.1f} | {y:.1f} | {x / y:.2f} |" in text


def test_on_the_shared_cpu_the_ratio_is_of_the_servers_own_cpu_time() -> None:
    """Wall-clock rates swing with the other tenants; tokens per CPU-second of the server do not."""
    from flagrelease.gate._throughput import pick_metric

    wall_on, wall_off = [300.0, 90.0, 250.0, 120.0, 280.0, 100.0], [110.0, 310.0, 95.0, 260.0, 105.0, 290.0]
    trials = _trials(wall_on, wall_off)
    with_cpu = ThroughputOutputs.model_validate(
        {
            **trials.model_dump(mode="json"),
            "trials": [
                # 256 tokens each: FlagGems on costs 2.0 CPU-seconds, off 1.6 (a true ratio of 0.8)
                {**t.model_dump(mode="json"), "cpu_s": 2.0 if t.arm == "target" else 1.6}
                for t in trials.trials
            ],
        }
    )
    assert pick_metric(with_cpu, setting="auto", chip="cpu") == "cpu"
    assert pick_metric(with_cpu, setting="auto", chip="nvidia-h100") == "wall"
    assert pick_metric(trials, setting="cpu", chip="cpu") == "wall"  # no CPU times: the wall clock
    wall = throughput_verdict(with_cpu, min_ratio=0.7, alpha=0.05, resamples=1000, metric="wall")
    cpu = throughput_verdict(with_cpu, min_ratio=0.7, alpha=0.05, resamples=1000, metric="cpu")
    assert wall is not None and cpu is not None
    assert wall["verdict"] == "inconclusive" and wall["ratio_ci"][1] - wall["ratio_ci"][0] > 1
    assert (cpu["metric"], cpu["verdict"], cpu["ratio"]) == ("cpu", "pass", 0.8)
    assert cpu["gems_on_rate"] == 128.0 and cpu["gems_off_rate"] == 160.0
    assert cpu["gems_on_tok_s"] == round(sum(wall_on) / 6, 2)  # the wall-clock means are still reported
