"""Statistics of the consistency gate: confidence intervals, paired tests, equivalence.

Pure functions on lists of per-item scores in [0, 1]; no files, no lm-eval.  Scores are
fractions here (0.9 means 90 %); the gate converts to percentage points.

The verdict on one benchmark compares a reference and a target, item by item:

* binary scores with one sample per item (the usual ``exact_match`` / ``acc``): the
  paired 2x2 table, McNemar's exact test for "any difference", and the Agresti-Min
  interval (0.5 added to each cell) for the difference, which behaves well even when no
  item disagrees;
* anything else (``k`` samples per item, or fractional scores): the ``k`` samples of an
  item are averaged and items are resampled by a paired bootstrap.  The same Agresti-Min
  pseudo-items are added, so that a handful of identical items never proves equivalence.

Both intervals are centred on the difference with the pseudo-counts added, which pulls
it slightly towards 0 (by a factor ``n / (n + 2)``); the reported ``diff`` is the raw
one.  With a few items this keeps one disagreement from proving a difference.

Equivalence is two one-sided tests (TOST) against ``margin`` at level ``alpha``, which is
the same as the ``1 - 2 alpha`` interval of the difference lying inside ``(-margin,
margin)``; "inconsistent" is the mirror image, the interval lying wholly beyond the
margin.  Anything else is inconclusive, and :func:`paired_comparison` estimates how many
more items (or samples per item) would decide it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

__all__ = [
    "PairedComparison",
    "Verdict",
    "agresti_min_interval",
    "binomial_cdf",
    "bootstrap_ci",
    "items_needed",
    "mcnemar_exact",
    "paired_comparison",
    "score_interval",
    "tost_normal",
    "wilson_interval",
]

Verdict = Literal["consistent", "inconsistent", "inconclusive"]

_STD = NormalDist()
#: Above this many resamples x draws, bootstrap in blocks to bound memory.
_BLOCK_CELLS = 2_000_000


def _z(p: float) -> float:
    """The standard normal quantile of ``p``."""
    return _STD.inv_cdf(p)


def wilson_interval(successes: int, *, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion.

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
    z = _z(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_cdf(x: int, *, n: int, p: float = 0.5) -> float:
    """``P(X <= x)`` for ``X ~ Binomial(n, p)``, exact for ``p = 0.5``.

    Raises:
        ValueError: ``n`` is negative or ``p`` is outside [0, 1].
    """
    if n < 0 or not 0 <= p <= 1:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if x < 0:
        return 0.0
    if x >= n:
        return 1.0
    if p == 0.5:
        # Integer arithmetic is exact, and fast enough for the tens of thousands of
        # discordant pairs a benchmark can have.
        return sum(math.comb(n, i) for i in range(x + 1)) / 2**n
    total = 0.0
    for i in range(x + 1):
        log_term = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
        if 0 < p < 1:
            log_term += i * math.log(p) + (n - i) * math.log1p(-p)
            total += math.exp(log_term)
        elif (p == 0 and i == 0) or (p == 1 and i == n):
            total += 1.0
    return min(1.0, total)


def mcnemar_exact(b: int, *, c: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of a paired 2x2 table.

    Args:
        b: items the target got right and the reference wrong.
        c: items the reference got right and the target wrong.

    Returns:
        The p-value of "both kinds of disagreement are equally likely"; 1.0 without any.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_cdf(min(b, c), n=n, p=0.5))


def tost_normal(diff: float, *, se: float, margin: float) -> tuple[float, float]:
    """Two one-sided tests of equivalence with a normal statistic.

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
    p_lower = 1 - _STD.cdf((diff + margin) / se)  # H0: diff <= -margin
    p_upper = _STD.cdf((diff - margin) / se)  # H0: diff >= margin
    beyond_up = 1 - _STD.cdf((diff - margin) / se)  # H0: diff <= margin
    beyond_low = _STD.cdf((diff + margin) / se)  # H0: diff >= -margin
    return max(p_lower, p_upper), min(beyond_up, beyond_low)


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
    z = _z(0.5 + confidence / 2)
    return est, se, max(-1.0, est - z * se), min(1.0, est + z * se)


def _bootstrap_means(
    points: np.ndarray, *, probs: np.ndarray | None, draws: int, resamples: int, seed: int
) -> np.ndarray:
    """Means of ``draws`` points drawn with replacement, ``resamples`` times."""
    rng = np.random.default_rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    block = max(1, _BLOCK_CELLS // max(draws, 1))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        if probs is None:
            idx = rng.integers(0, len(points), size=(size, draws))
        else:
            idx = rng.choice(len(points), size=(size, draws), p=probs)
        out[start : start + size] = points[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean.

    Args:
        values: the observations (at least one).
        confidence: two-sided confidence level.
        resamples: bootstrap resamples.
        seed: random seed (the result is deterministic for a seed).

    Returns:
        ``(low, high)``.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    means = _bootstrap_means(arr, probs=None, draws=arr.size, resamples=resamples, seed=seed)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _item_means(items: Sequence[Sequence[float]], side: str) -> np.ndarray:
    means = np.empty(len(items), dtype=np.float64)
    for i, samples in enumerate(items):
        if len(samples) == 0:
            raise ValueError(f"{side} item {i} has no samples")
        arr = np.asarray(samples, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{side} item {i} has a score outside [0, 1]: {list(samples)}")
        means[i] = arr.mean()
    return means


def _is_binary_single(items: Sequence[Sequence[float]]) -> bool:
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
    means = _item_means(items, "an")
    if means.size == 0:
        raise ValueError("score_interval needs at least one item")
    mean = float(means.mean())
    if _is_binary_single(items):
        return mean, wilson_interval(int(means.sum() + 0.5), n=means.size, confidence=confidence), "wilson"
    points = np.concatenate([means, [0.0, 1.0]])
    boot = _bootstrap_means(points, probs=None, draws=points.size, resamples=resamples, seed=seed)
    tail = (1 - confidence) / 2
    return mean, (float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))), "bootstrap"


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
    z_power = _z(1 - beta / 2) if diff == 0 else _z(1 - beta)
    return (_z(1 - alpha) + z_power) ** 2 * sd * sd / (gap * gap)


@dataclass(frozen=True)
class PairedComparison:
    """A reference and a target compared on one benchmark (all figures are fractions).

    Attributes:
        n_items: items present on both sides.
        samples_per_item: samples per item of the target (``k``).
        reference, target: mean scores.
        reference_ci, target_ci: their ``1 - alpha`` intervals.
        diff: target minus reference.
        diff_ci: the ``1 - 2 alpha`` interval of the difference (the TOST interval).
        p_value: "is there any difference": McNemar's exact test, or a paired bootstrap.
        tost_p: "is the difference inside the margin": TOST p-value.
        beyond_p: "is the difference beyond the margin": one-sided p-value.
        test: ``mcnemar+tost`` or ``bootstrap+tost``.
        verdict: consistent, inconsistent or inconclusive.
        more_items_needed: for inconclusive verdicts, about how many more items decide.
        more_samples_needed: for inconclusive verdicts with k > 1, about how many more
            samples per item decide with the same items (None when more samples alone
            cannot).
        discordant: for binary single-sample scores, ``(b, c)``: items only the target
            got right, and items only the reference got right.
    """

    n_items: int
    samples_per_item: int
    reference: float
    target: float
    reference_ci: tuple[float, float]
    target_ci: tuple[float, float]
    diff: float
    diff_ci: tuple[float, float]
    p_value: float
    tost_p: float
    beyond_p: float
    test: str
    verdict: Verdict
    margin: float
    alpha: float
    more_items_needed: int | None = None
    more_samples_needed: int | None = None
    discordant: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """The comparison as a JSON-able dict."""
        return asdict(self)


def _verdict(tost_p: float, beyond_p: float, alpha: float) -> Verdict:
    if tost_p < alpha:
        return "consistent"
    if beyond_p < alpha:
        return "inconsistent"
    return "inconclusive"


def _more_samples(
    reference: Sequence[Sequence[float]],
    target: Sequence[Sequence[float]],
    *,
    diff: float,
    observed_var: float,
    margin: float,
    alpha: float,
    power: float,
) -> int | None:
    """Samples per item that would decide with the same items (k > 1 only)."""
    k = min(min(len(s) for s in target), min(len(s) for s in reference))
    if k < 2:
        return None
    within = float(np.mean([np.var(t, ddof=1) + np.var(r, ddof=1) for t, r in zip(target, reference, strict=True)]))
    between = max(0.0, observed_var - within / k)
    n = len(target)
    per_item_needed = items_needed(diff, sd=1.0, margin=margin, alpha=alpha, power=power)
    if per_item_needed is None or within <= 0:
        return None
    allowed = n / per_item_needed  # the largest per-item variance that n items can afford
    if allowed <= between:
        return None
    k_new = math.ceil(within / (allowed - between))
    return k_new - k if k_new > k else None


def paired_comparison(
    reference: Sequence[Sequence[float]],
    *,
    target: Sequence[Sequence[float]],
    margin: float,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
    power: float = 0.8,
) -> PairedComparison:
    """Compare a target with a reference on the same items.

    Args:
        reference: per item, the reference's sample scores (each in [0, 1]).
        target: the same items in the same order, the target's sample scores.
        margin: equivalence margin as a fraction (0.05 for 5 points).
        alpha: level of each one-sided test (the difference interval is ``1 - 2 alpha``).
        resamples: bootstrap resamples.
        seed: random seed of the bootstrap.
        power: the power assumed when estimating how many more items would decide.

    Returns:
        The comparison, with its verdict.

    Raises:
        ValueError: the two sides have different numbers of items, no items, or a
            score outside [0, 1].
    """
    if len(reference) != len(target):
        raise ValueError(f"reference has {len(reference)} items but target has {len(target)}")
    if not reference:
        raise ValueError("no items to compare")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    ref_means = _item_means(reference, "reference")
    tgt_means = _item_means(target, "target")
    n = len(ref_means)
    k = min(len(s) for s in target)
    ref_mean, ref_ci, _ = score_interval(reference, confidence=1 - alpha, resamples=resamples, seed=seed)
    tgt_mean, tgt_ci, _ = score_interval(target, confidence=1 - alpha, resamples=resamples, seed=seed + 1)
    diff = float(tgt_means.mean() - ref_means.mean())

    discordant: tuple[int, int] | None = None
    if _is_binary_single(reference) and _is_binary_single(target):
        b = int(np.sum((tgt_means == 1) & (ref_means == 0)))
        c = int(np.sum((tgt_means == 0) & (ref_means == 1)))
        est, se, lo, hi = agresti_min_interval(b, c=c, n=n, confidence=1 - 2 * alpha)
        tost_p, beyond_p = tost_normal(est, se=se, margin=margin)
        p_value = mcnemar_exact(b, c=c)
        per_item_var = se * se * (n + 2)
        test = "mcnemar+tost"
        discordant = (b, c)
    else:
        # Agresti-Min pseudo-items on the difference scale: weight 0.5 at +1 and at -1,
        # weight 1 at 0 (the (1,1) and (0,0) cells).
        diffs = tgt_means - ref_means
        points = np.concatenate([diffs, [1.0, -1.0, 0.0]])
        weights = np.concatenate([np.ones(n), [0.5, 0.5, 1.0]])
        probs = weights / weights.sum()
        boot = _bootstrap_means(points, probs=probs, draws=n + 2, resamples=resamples, seed=seed + 2)
        centre = float(np.sum(points * probs))
        lo, hi = float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
        denom = resamples + 1
        tost_p = max(1 + np.sum(boot <= -margin), 1 + np.sum(boot >= margin)) / denom
        beyond_p = min(1 + np.sum(boot <= margin), 1 + np.sum(boot >= -margin)) / denom
        p_value = min(1.0, 2 * min(1 + np.sum(boot <= 0), 1 + np.sum(boot >= 0)) / denom)
        per_item_var = float(np.sum(probs * (points - centre) ** 2))
        test = "bootstrap+tost"
    verdict = _verdict(float(tost_p), float(beyond_p), alpha)

    more_items = more_samples = None
    if verdict == "inconclusive":
        needed = items_needed(diff, sd=math.sqrt(per_item_var), margin=margin, alpha=alpha, power=power)
        if needed is not None:
            more_items = max(1, math.ceil(needed) - n)
        more_samples = _more_samples(
            reference, target, diff=diff, observed_var=per_item_var, margin=margin, alpha=alpha, power=power
        )
    return PairedComparison(
        n_items=n,
        samples_per_item=k,
        reference=ref_mean,
        target=tgt_mean,
        reference_ci=ref_ci,
        target_ci=tgt_ci,
        diff=diff,
        diff_ci=(lo, hi),
        p_value=float(p_value),
        tost_p=float(tost_p),
        beyond_p=float(beyond_p),
        test=test,
        verdict=verdict,
        margin=margin,
        alpha=alpha,
        more_items_needed=more_items,
        more_samples_needed=more_samples,
        discordant=discordant,
    )
