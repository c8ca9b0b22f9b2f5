"""Accuracy comparisons: paired, unpaired, and FlagRelease's relative rule (see :mod:`flagrelease.gate.stats`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    test_proportions_2indep,
    tost_proportions_2indep,
)

from flagrelease.gate._stats_base import (
    agresti_min_interval,
    bootstrap_means,
    is_binary_single,
    item_means,
    items_needed,
    mcnemar_exact,
    score_interval,
    tost_normal,
    tost_power,
    wilson_interval,
)

__all__ = [
    "PairedComparison",
    "UnpairedComparison",
    "Verdict",
    "paired_comparison",
    "relative_verdict",
    "unpaired_comparison",
]

Verdict = Literal["consistent", "inconsistent", "inconclusive"]


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
    ref_means = item_means(reference, "reference")
    tgt_means = item_means(target, "target")
    n = len(ref_means)
    k = min(len(s) for s in target)
    ref_mean, ref_ci, _ = score_interval(reference, confidence=1 - alpha, resamples=resamples, seed=seed)
    tgt_mean, tgt_ci, _ = score_interval(target, confidence=1 - alpha, resamples=resamples, seed=seed + 1)
    diff = float(tgt_means.mean() - ref_means.mean())

    discordant: tuple[int, int] | None = None
    if is_binary_single(reference) and is_binary_single(target):
        b = int(np.sum((tgt_means == 1) & (ref_means == 0)))
        c = int(np.sum((tgt_means == 0) & (ref_means == 1)))
        est, se, lo, hi = agresti_min_interval(b, c=c, n=n, confidence=1 - 2 * alpha)
        tost_p, beyond_p = tost_normal(est, se=se, margin=margin)
        p_value = mcnemar_exact(b, c=c)
        per_item_var = se * se * (n + 2)
        test = "mcnemar+tost"
        discordant = (b, c)
    else:
        # Pseudo-items at +1, -1 and 0 on the difference scale (the Agresti-Min idea):
        # identical items alone never prove equivalence.
        points = np.concatenate([tgt_means - ref_means, [1.0, -1.0, 0.0]])
        boot = bootstrap_means(points, resamples=resamples, seed=seed + 2)
        lo, hi = float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
        denom = resamples + 1
        tost_p = max(1 + np.sum(boot <= -margin), 1 + np.sum(boot >= margin)) / denom
        beyond_p = min(1 + np.sum(boot <= margin), 1 + np.sum(boot >= -margin)) / denom
        p_value = min(1.0, 2 * min(1 + np.sum(boot <= 0), 1 + np.sum(boot >= 0)) / denom)
        per_item_var = float(np.var(points))
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


# --------------------------------------------------------------------------------------
# Unpaired: a reference known only by its published score
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnpairedComparison:
    """A target's items against a published reference score (all figures are fractions).

    Attributes:
        n_items: the target's items.
        samples_per_item: the target's samples per item.
        reference_n: the items the reference score was computed on.
        reference_n_assumed: whether ``reference_n`` was unknown and taken as ``n_items``.
        reference, target: the two scores.
        reference_ci, target_ci: their ``1 - alpha`` intervals (Wilson for the reference).
        diff, diff_ci: target minus reference, with its ``1 - 2 alpha`` interval
            (Agresti-Caffo, two independent proportions).
        p_value: "is there any difference" (two-sided).
        tost_p, beyond_p: equivalence and beyond-the-margin p-values.
        power: the probability that this test shows equivalence when the two are truly
            equal: how much a "consistent" can be expected at all with these counts.
        test: ``unpaired-tost``.
        verdict: consistent, inconsistent or inconclusive.
    """

    n_items: int
    samples_per_item: int
    reference_n: int
    reference_n_assumed: bool
    reference: float
    target: float
    reference_ci: tuple[float, float]
    target_ci: tuple[float, float]
    diff: float
    diff_ci: tuple[float, float]
    p_value: float
    tost_p: float
    beyond_p: float
    power: float
    test: str
    verdict: Verdict
    margin: float
    alpha: float

    def to_json(self) -> dict[str, Any]:
        """The comparison as a JSON-able dict."""
        return asdict(self)


def unpaired_comparison(
    reference: float,
    *,
    target: Sequence[Sequence[float]],
    margin: float,
    reference_n: int | None = None,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> UnpairedComparison:
    """Compare a target's items with a reference known only by its score (statsmodels' TOST of two proportions).

    The two are treated as independent binomial samples: the target's ``n`` items (each
    item's mean over its samples counts as its share of a success, which is conservative
    when ``k > 1``) and the reference's ``reference_n`` items.  Being unpaired, this test
    has much less power than the paired one on the same items; the result says how much.

    Args:
        reference: the published score as a fraction.
        target: per item, the target's sample scores (each in [0, 1]).
        margin: equivalence margin as a fraction.
        reference_n: items behind the published score (None: assumed equal to the target's).
        alpha: level of each one-sided test.
        resamples: bootstrap resamples (the target's interval when ``k > 1``).
        seed: random seed.

    Raises:
        ValueError: no items, a score outside [0, 1], or a reference outside [0, 1].
    """
    if not target:
        raise ValueError("no items to compare")
    if not 0 <= reference <= 1:
        raise ValueError(f"the reference score must be a fraction in [0, 1], got {reference}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    means = item_means(target, "target")
    n = int(means.size)
    n_ref = int(reference_n or n)
    tgt_mean, tgt_ci, _ = score_interval(target, confidence=1 - alpha, resamples=resamples, seed=seed)
    count_t, count_r = float(means.sum()), round(reference * n_ref)
    ref_ci = wilson_interval(count_r, n=n_ref, confidence=1 - alpha)
    # statsmodels also computes an odds ratio, which divides by zero at a score of 100 %.
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = confint_proportions_2indep(count_t, n, count_r, n_ref, method="agresti-caffo", alpha=2 * alpha)
        tost = tost_proportions_2indep(count_t, n, count_r, n_ref, -margin, margin, method="agresti-caffo")
        any_diff = test_proportions_2indep(count_t, n, count_r, n_ref, method="agresti-caffo")
        above = test_proportions_2indep(
            count_t, n, count_r, n_ref, value=margin, method="agresti-caffo", alternative="larger"
        )
        below = test_proportions_2indep(
            count_t, n, count_r, n_ref, value=-margin, method="agresti-caffo", alternative="smaller"
        )
    tost_p, beyond_p = float(tost.pvalue), float(min(above.pvalue, below.pvalue))
    se = math.sqrt(float(tost.results_larger.variance))
    return UnpairedComparison(
        n_items=n,
        samples_per_item=min(len(s) for s in target),
        reference_n=n_ref,
        reference_n_assumed=reference_n is None,
        reference=reference,
        target=tgt_mean,
        reference_ci=ref_ci,
        target_ci=tgt_ci,
        diff=tgt_mean - reference,
        diff_ci=(float(low), float(high)),
        p_value=float(any_diff.pvalue),
        tost_p=tost_p,
        beyond_p=beyond_p,
        power=tost_power(se=se, margin=margin, alpha=alpha),
        test="unpaired-tost",
        verdict=_verdict(tost_p, beyond_p, alpha),
        margin=margin,
        alpha=alpha,
    )


# --------------------------------------------------------------------------------------
# FlagRelease's relative rule
# --------------------------------------------------------------------------------------
def relative_verdict(
    reference: float,
    *,
    target: float,
    n_items: int,
    max_drop: float = 0.05,
    noise_items: int = 2,
    noise_max_n: int = 100,
) -> tuple[Verdict, float | None, str]:
    """FlagRelease's rule: the target may score at most ``max_drop`` of the reference lower.

    A drop beyond that fails, except in the small-sample noise zone: on ``noise_max_n``
    items or fewer, a gap of ``noise_items`` items or fewer means "retest"
    (inconclusive), not fail.  Gains always pass.  This is a rule on the two scores, not
    a test: use it to reproduce FlagRelease's verdicts (see docs/ARCHITECTURE.md).

    Args:
        reference: the reference's score, a fraction.
        target: the target's score, a fraction.
        n_items: the items both were scored on.
        max_drop: the largest drop as a fraction of the reference (0.05: 5 %).
        noise_items: the noise zone's largest gap, in items.
        noise_max_n: the noise zone's largest benchmark, in items.

    Returns:
        ``(verdict, relative_drop, note)``; ``relative_drop`` is ``(reference - target) /
        reference`` (None when the reference is 0).
    """
    drop = reference - target
    relative = drop / reference if reference > 0 else None
    if drop <= 0 or (relative is not None and relative <= max_drop + 1e-12):
        return "consistent", relative, ""
    gap_items = drop * n_items
    # Published scores carry two decimals: a gap within 0.01 item of the zone's edge is on it.
    if n_items <= noise_max_n and round(gap_items, 2) <= noise_items:
        return (
            "inconclusive",
            relative,
            f"a gap of {gap_items:.3g} item(s) on {n_items} items is in the noise zone "
            f"(<= {noise_items} on <= {noise_max_n}): retest",
        )
    return "inconsistent", relative, ""
