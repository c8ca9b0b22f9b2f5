"""Throughput: a ratio over interleaved rounds, with a bootstrap interval (see :mod:`flagrelease.gate.stats`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

__all__ = ["RatioComparison", "ThroughputVerdict", "ratio_comparison"]

ThroughputVerdict = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class RatioComparison:
    """Arm A over arm B (FlagGems on over off) from paired rounds.

    Attributes:
        rounds: paired rounds.
        mean_a, mean_b: the arms' mean tokens/s.
        ratio: the geometric mean of the rounds' ratios ``a / b``.
        ratio_ci: its ``1 - 2 alpha`` interval (paired bootstrap over rounds, expanded).
        min_ratio: the threshold.
        p_below: bootstrap p-value of "the ratio is at least ``min_ratio``" (small: fail).
        p_above: bootstrap p-value of "the ratio is at most ``min_ratio``" (small: pass).
        verdict: ``pass`` (the interval lies above ``min_ratio``), ``fail`` (below it) or
            ``inconclusive``.
        alpha: level of each one-sided test.
        method: how the interval was made.
    """

    rounds: int
    mean_a: float
    mean_b: float
    ratio: float
    ratio_ci: tuple[float, float]
    min_ratio: float
    p_below: float
    p_above: float
    verdict: ThroughputVerdict
    alpha: float
    method: str

    def to_json(self) -> dict[str, Any]:
        """The comparison as a JSON-able dict."""
        return asdict(self)


def _geometric_mean(log_ratios: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(np.exp(log_ratios.mean(axis=axis)))


def ratio_comparison(
    a: Sequence[float],
    *,
    b: Sequence[float],
    min_ratio: float,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> RatioComparison:
    """Judge arm A over arm B against ``min_ratio``, rounds paired.

    ``a[i]`` and ``b[i]`` are measured in the same round, one right after the other, so a
    machine load that drifts over the measurement multiplies both: the round's ratio
    ``a[i] / b[i]`` cancels it, and the estimate is the geometric mean of those ratios.
    Rounds are resampled by ``scipy.stats.bootstrap``; the interval's tails are taken at
    Hesterberg's expanded-percentile levels ``Phi(sqrt(n / (n - 1)) t_{n-1}(alpha))``,
    which keep the error rate near ``alpha`` with as few as six rounds (a plain
    percentile interval is too narrow there, failing a good build about twice as often).

    Args:
        a: tokens/s of arm A (FlagGems on), one per round.
        b: tokens/s of arm B (FlagGems off), same rounds.
        min_ratio: the smallest acceptable ratio.
        alpha: level of each one-sided test (the interval is ``1 - 2 alpha``).
        resamples: bootstrap resamples.
        seed: random seed.

    Raises:
        ValueError: fewer than two rounds, unequal lengths, or a non-positive value.
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = xa.size
    if n != xb.size or n < 2:
        raise ValueError(f"need two or more paired rounds, got {xa.size} and {xb.size}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(xb))) or xa.min() <= 0 or xb.min() <= 0:
        raise ValueError("throughputs must be positive and finite")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    logs = np.log(xa / xb)
    ratio = float(np.exp(logs.mean()))
    level = float(sps.norm.cdf(math.sqrt(n / (n - 1)) * sps.t.ppf(alpha, n - 1)))
    if np.ptp(logs) == 0:
        boot = np.full(resamples, ratio)
    else:
        res = sps.bootstrap(
            (logs,),
            _geometric_mean,
            vectorized=True,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        boot = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    lo, hi = float(np.quantile(boot, level)), float(np.quantile(boot, 1 - level))
    verdict: ThroughputVerdict = "pass" if lo > min_ratio else "fail" if hi < min_ratio else "inconclusive"
    denom = resamples + 1
    return RatioComparison(
        rounds=n,
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        ratio=ratio,
        ratio_ci=(lo, hi),
        min_ratio=min_ratio,
        p_below=float((1 + np.sum(boot >= min_ratio)) / denom),
        p_above=float((1 + np.sum(boot <= min_ratio)) / denom),
        verdict=verdict,
        alpha=alpha,
        method=f"geometric mean of {n} paired rounds' ratios; bootstrap, expanded percentile ({1 - 2 * alpha:.0%})",
    )
