"""The FlagGems on/off throughput verdict, from the eval stage's interleaved trials."""

from __future__ import annotations

import math
from typing import Any

from flagrelease.evaluate.outputs import ThroughputOutputs
from flagrelease.gate.stats import ratio_comparison

__all__ = ["pick_metric", "single_ratio", "throughput_verdict"]


def pick_metric(trials: ThroughputOutputs, *, setting: str, chip: str) -> str:
    """``wall`` or ``cpu``: what ``gates.throughput.metric`` means for these trials.

    ``auto`` is ``cpu`` on the cpu chip when every trial has the server's CPU time: there
    the server shares the host's cores with everything else, so its tokens per wall-clock
    second mostly measure the other tenants.  ``cpu`` without CPU times falls back to ``wall``.
    """
    have_cpu = bool(trials.trials) and all(t.cpu_s for t in trials.trials)
    if setting == "cpu" or (setting == "auto" and chip == "cpu"):
        return "cpu" if have_cpu else "wall"
    return "wall"


def throughput_verdict(
    trials: ThroughputOutputs,
    *,
    min_ratio: float,
    alpha: float,
    resamples: int,
    seed: int = 0,
    metric: str = "wall",
) -> dict[str, Any] | None:
    """Judge FlagGems on over off from paired rounds: pass, fail or inconclusive, with every trial.

    A round whose two trials are not both there (or produced nothing) is left out.

    Args:
        trials: the eval stage's throughput trials.
        min_ratio: ``gates.throughput_min_ratio``.
        alpha: level of each one-sided test.
        resamples: bootstrap resamples.
        seed: random seed.
        metric: ``wall`` (output tokens per wall-clock second) or ``cpu`` (per second of
            the server's CPU time; see :func:`pick_metric`).

    Returns:
        The ``throughput`` entry of the gate results (docs/ARCHITECTURE.md), None when
        fewer than two complete rounds exist.
    """
    on, off = trials.arms["a"], trials.arms["b"]
    by_round: dict[int, dict[str, float]] = {}
    for t in trials.trials:
        rate = t.rate(metric)
        if t.tok_s > 0 and rate:
            by_round.setdefault(t.round, {})[t.arm] = rate
    rounds = sorted(r for r, arms in by_round.items() if on in arms and off in arms)
    if len(rounds) < 2:
        return None
    cmp = ratio_comparison(
        [by_round[r][on] for r in rounds],
        b=[by_round[r][off] for r in rounds],
        min_ratio=min_ratio,
        alpha=alpha,
        resamples=resamples,
        seed=seed,
    )
    wall = {arm: [t.tok_s for t in trials.trials if t.arm == arm and t.round in set(rounds)] for arm in (on, off)}
    return {
        "gems_on_tok_s": round(sum(wall[on]) / len(wall[on]), 2),
        "gems_off_tok_s": round(sum(wall[off]) / len(wall[off]), 2),
        "metric": metric,
        "gems_on_rate": round(cmp.mean_a, 2),
        "gems_off_rate": round(cmp.mean_b, 2),
        "ratio": round(cmp.ratio, 3),
        "ratio_ci": [round(cmp.ratio_ci[0], 3), round(cmp.ratio_ci[1], 3)],
        "ci_level": round(1 - 2 * alpha, 4),
        "min_ratio": min_ratio,
        "verdict": cmp.verdict,
        "ok": {"pass": True, "fail": False}.get(cmp.verdict),
        "p_below": round(cmp.p_below, 4),
        "p_above": round(cmp.p_above, 4),
        "rounds": cmp.rounds,
        "method": cmp.method,
        "arms": {"on": on, "off": off},
        "servers": trials.servers,
        "settings": trials.settings,
        "seconds": trials.seconds,
        "trials": [t.model_dump(mode="json") for t in trials.trials],
    }


def single_ratio(on: float | None, off: float | None, min_ratio: float) -> dict[str, Any] | None:
    """The ratio of two single measurements, for eval results made without trials (no interval)."""
    if on is None or off is None:
        return None
    ratio = on / off if off > 0 else math.inf
    return {
        "gems_on_tok_s": round(on, 2),
        "gems_off_tok_s": round(off, 2),
        "ratio": round(ratio, 3) if math.isfinite(ratio) else None,
        "min_ratio": min_ratio,
        "ok": bool(ratio >= min_ratio),
    }
