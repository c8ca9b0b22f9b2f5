"""The building blocks of the gate's statistics (see :mod:`flagrelease.gate.stats`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar

__all__ = [
    "agresti_min_interval",
    "binomial_cdf",
    "bootstrap_ci",
    "bootstrap_means",
    "is_binary_single",
    "item_means",
    "items_needed",
    "mcnemar_exact",
    "score_interval",
    "tost_normal",
    "tost_power",
    "wilson_interval",
    "z_quantile",
]

#: Above this many resamples x draws, bootstrap in batches to bound memory.
_BATCH_CELLS = 2_000_000


def z_quantile(p: float) -> float:
    """The standard normal quantile of ``p``."""
    return float(sps.norm.ppf(p))


def wilson_interval(successes: int, *, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``scipy.stats.binomtest``).

    Args:
        successes: number of successes.
        n: number of trials (positive).
        confidence: two-sided confidence level.

    Returns:
        ``(low, high)``, fractions in [0, 1].

    Raises:
        ValueError: ``n`` is not positive or ``successes`` is not in ``[0, n]``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def binomial_cdf(x: int, *, n: int, p: float = 0.5) -> float:
    """``P(X <= x)`` for ``X ~ Binomial(n, p)`` (``scipy.stats.binom``).

    Raises:
        ValueError: ``n`` is negative or ``p`` is outside [0, 1].
    """
    if n < 0 or not 0 <= p <= 1:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    return float(min(1.0, max(0.0, sps.binom.cdf(x, n, p))))


def mcnemar_exact(b: int, *, c: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of a paired 2x2 table (statsmodels).

    Args:
        b: items the target got right and the reference wrong.
        c: items the reference got right and the target wrong.

    Returns:
        The p-value of "both kinds of disagreement are equally likely"; 1.0 without any.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, mcnemar([[0, b], [c, 0]], exact=True).pvalue))


def tost_normal(diff: float, *, se: float, margin: float) -> tuple[float, float]:
    """Two one-sided z-tests of equivalence (``scipy.stats.norm``).

    Args:
        diff: the estimated difference.
        se: its standard error (0 is allowed: the tests then become exact statements).
        margin: the equivalence margin (positive, same unit as ``diff``).

    Returns:
        ``(tost_p, beyond_p)``: the p-value of equivalence (both one-sided nulls
        ``diff <= -margin`` and ``diff >= margin`` rejected) and the p-value of the
        difference lying beyond the margin on the side it points to.
    """
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    if se <= 0:
        inside = -margin < diff < margin
        outside = diff > margin or diff < -margin
        return (0.0 if inside else 1.0), (0.0 if outside else 1.0)
    norm = sps.norm
    p_lower = float(norm.sf((diff + margin) / se))  # H0: diff <= -margin
    p_upper = float(norm.cdf((diff - margin) / se))  # H0: diff >= margin
    beyond_up = float(norm.sf((diff - margin) / se))  # H0: diff <= margin
    beyond_low = float(norm.cdf((diff + margin) / se))  # H0: diff >= -margin
    return max(p_lower, p_upper), min(beyond_up, beyond_low)


def tost_power(*, se: float, margin: float, alpha: float, diff: float = 0.0) -> float:
    """The probability that the TOST shows equivalence when the true difference is ``diff``.

    Normal approximation: both one-sided tests at level ``alpha`` must reject.
    """
    if se <= 0:
        return 1.0 if abs(diff) < margin else 0.0
    z = z_quantile(1 - alpha)
    return float(max(0.0, sps.norm.cdf((margin - diff) / se - z) - sps.norm.cdf((-margin - diff) / se + z)))


def agresti_min_interval(b: int, *, c: int, n: int, confidence: float = 0.90) -> tuple[float, float, float, float]:
    """The Agresti-Min interval for a difference of paired proportions.

    Adds 0.5 to each cell of the paired 2x2 table (Agresti and Min, 2005), which keeps
    the interval honest when few or no items disagree.

    Args:
        b: items where the target is right and the reference wrong.
        c: items where the reference is right and the target wrong.
        n: all items.
        confidence: two-sided confidence level.

    Returns:
        ``(estimate, se, low, high)`` of target minus reference, as fractions; the
        estimate is the adjusted one the interval is centred on.
    """
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need n > 0 and 0 <= b + c <= n, got b={b}, c={c}, n={n}")
    m = n + 2
    pb, pc = (b + 0.5) / m, (c + 0.5) / m
    est = pb - pc
    se = math.sqrt(max(0.0, pb + pc - est * est) / m)
    z = z_quantile(0.5 + confidence / 2)
    return est, se, max(-1.0, est - z * se), min(1.0, est + z * se)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(x.mean(axis=axis))


def bootstrap_means(values: Sequence[float] | np.ndarray, *, resamples: int, seed: int) -> np.ndarray:
    """The bootstrap distribution of a mean (``scipy.stats.bootstrap``), deterministic for a seed."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2 or np.all(arr == arr[0]):
        return np.full(resamples, float(arr.mean()) if arr.size else math.nan)
    res = sps.bootstrap(
        (arr,),
        _mean,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        batch=max(1, _BATCH_CELLS // arr.size),
        rng=np.random.default_rng(seed),
    )
    return np.asarray(res.bootstrap_distribution, dtype=np.float64)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (``scipy.stats.bootstrap``).

    Args:
        values: the observations (at least one).
        confidence: two-sided confidence level.
        resamples: bootstrap resamples.
        seed: random seed (the result is deterministic for a seed).

    Returns:
        ``(low, high)``.
    """
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    boot = bootstrap_means(values, resamples=resamples, seed=seed)
    tail = (1 - confidence) / 2
    return float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))


def item_means(items: Sequence[Sequence[float]], side: str) -> np.ndarray:
    """Each item's mean over its samples; every score must be in [0, 1].

    Raises:
        ValueError: an item has no samples or a score outside [0, 1].
    """
    means = np.empty(len(items), dtype=np.float64)
    for i, samples in enumerate(items):
        if len(samples) == 0:
            raise ValueError(f"{side} item {i} has no samples")
        arr = np.asarray(samples, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{side} item {i} has a score outside [0, 1]: {list(samples)}")
        means[i] = arr.mean()
    return means


def is_binary_single(items: Sequence[Sequence[float]]) -> bool:
    """Whether every item has one sample scored 0 or 1."""
    return all(len(s) == 1 and s[0] in (0, 1) for s in items)


def score_interval(
    items: Sequence[Sequence[float]], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, tuple[float, float], str]:
    """The mean score over items and its confidence interval.

    Binary scores with one sample per item get the Wilson interval; otherwise the item
    means (each averaging its ``k`` samples) are bootstrapped, with one pseudo-item at 0
    and one at 1 so that the interval never collapses to a point.

    Args:
        items: per item, the scores of its samples, each in [0, 1].
        confidence: two-sided level.
        resamples: bootstrap resamples.
        seed: random seed.

    Returns:
        ``(mean, (low, high), method)`` with method ``wilson`` or ``bootstrap``.
    """
    means = item_means(items, "an")
    if means.size == 0:
        raise ValueError("score_interval needs at least one item")
    mean = float(means.mean())
    if is_binary_single(items):
        return mean, wilson_interval(int(means.sum() + 0.5), n=means.size, confidence=confidence), "wilson"
    points = np.concatenate([means, [0.0, 1.0]])
    return mean, bootstrap_ci(points, confidence=confidence, resamples=resamples, seed=seed), "bootstrap"


def items_needed(diff: float, *, sd: float, margin: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Items needed for a paired test to decide, given the difference and spread seen.

    For ``|diff| < margin`` this is the TOST sample size (Chow, Shao and Wang); for
    ``|diff| > margin``, that of a one-sided test of the difference lying beyond the
    margin.  Both use the per-item standard deviation of the paired differences.

    Returns:
        The number of items (not rounded), or None when ``|diff| == margin`` (no
        number of items decides) or ``sd`` is 0 (any number does).
    """
    gap = abs(abs(diff) - margin)
    if gap == 0 or sd <= 0:
        return None
    beta = 1 - power
    z_power = z_quantile(1 - beta / 2) if diff == 0 else z_quantile(1 - beta)
    return (z_quantile(1 - alpha) + z_power) ** 2 * sd * sd / (gap * gap)
