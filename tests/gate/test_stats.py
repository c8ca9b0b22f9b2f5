"""flagrelease.gate.stats: known values (cross-checked with scipy), edge cases, error rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from flagrelease.gate.stats import (
    agresti_min_interval,
    binomial_cdf,
    bootstrap_ci,
    items_needed,
    mcnemar_exact,
    paired_comparison,
    score_interval,
    tost_normal,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (5, 10), (87, 100), (1, 3), (1319, 1400)])
@pytest.mark.parametrize("conf", [0.95, 0.90])
def test_wilson_matches_scipy(k: int, n: int, conf: float) -> None:
    want = sps.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
    lo, hi = wilson_interval(k, n=n, confidence=conf)
    assert lo == pytest.approx(want.low, abs=1e-9)
    assert hi == pytest.approx(want.high, abs=1e-9)


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, n=2)
    with pytest.raises(ValueError):
        wilson_interval(0, n=0)


@pytest.mark.parametrize(("x", "n", "p"), [(0, 5, 0.5), (3, 10, 0.5), (10, 10, 0.5), (499, 1000, 0.5), (4, 20, 0.3)])
def test_binomial_cdf_matches_scipy(x: int, n: int, p: float) -> None:
    assert binomial_cdf(x, n=n, p=p) == pytest.approx(sps.binom.cdf(x, n, p), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("b", "c"), [(2, 8), (8, 2), (0, 0), (0, 7), (25, 25), (30, 12), (400, 350)])
def test_mcnemar_exact_matches_scipy(b: int, c: int) -> None:
    want = 1.0 if b + c == 0 else sps.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c=c) == pytest.approx(want, rel=1e-9)


def test_mcnemar_textbook_value() -> None:
    # 2 vs 8 discordant pairs: P = 2 * P(X <= 2 | Bin(10, 1/2)) = 2 * 56/1024.
    assert mcnemar_exact(2, c=8) == pytest.approx(112 / 1024)


def test_tost_normal_matches_formula() -> None:
    d, se, m = 0.01, 0.02, 0.05
    tost_p, beyond_p = tost_normal(d, se=se, margin=m)
    want_tost = max(1 - sps.norm.cdf((d + m) / se), sps.norm.cdf((d - m) / se))
    assert tost_p == pytest.approx(want_tost, rel=1e-9)
    assert beyond_p == pytest.approx(min(1 - sps.norm.cdf((d - m) / se), sps.norm.cdf((d + m) / se)), rel=1e-9)
    # Zero standard error: exact statements.
    assert tost_normal(0.0, se=0.0, margin=0.05) == (0.0, 1.0)
    assert tost_normal(0.2, se=0.0, margin=0.05) == (1.0, 0.0)


def test_agresti_min_matches_formula() -> None:
    b, c, n = 10, 5, 100
    est, se, lo, hi = agresti_min_interval(b, c=c, n=n, confidence=0.90)
    pb, pc = 10.5 / 102, 5.5 / 102
    want_se = math.sqrt((pb + pc - (pb - pc) ** 2) / 102)
    z = sps.norm.ppf(0.95)
    assert est == pytest.approx(pb - pc)
    assert se == pytest.approx(want_se)
    assert (lo, hi) == pytest.approx((pb - pc - z * want_se, pb - pc + z * want_se))


def test_agresti_min_never_collapses() -> None:
    # No discordant pairs: the interval still has width, shrinking with n.
    widths = []
    for n in (3, 30, 300, 3000):
        _, _, lo, hi = agresti_min_interval(0, c=0, n=n)
        assert lo < 0 < hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)


def test_bootstrap_ci_close_to_scipy_percentile() -> None:
    rng = np.random.default_rng(1)
    values = rng.random(300)
    lo, hi = bootstrap_ci(values, confidence=0.95, resamples=4000, seed=3)
    want = sps.bootstrap(
        (values,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile", random_state=5
    ).confidence_interval
    assert lo == pytest.approx(want.low, abs=0.006)
    assert hi == pytest.approx(want.high, abs=0.006)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)


def test_score_interval_methods() -> None:
    mean, ci, method = score_interval([[1], [0], [1], [1]])
    assert (mean, method) == (0.75, "wilson")
    assert ci == pytest.approx(wilson_interval(3, n=4))
    mean, (lo, hi), method = score_interval([[1, 1], [1, 1], [1, 1]])
    assert (mean, method) == (1.0, "bootstrap")
    assert lo < 1.0 and hi == 1.0  # the pseudo-items keep a perfect small sample from looking certain


def test_items_needed_formula() -> None:
    za, zb = sps.norm.ppf(0.95), sps.norm.ppf(0.9)
    assert items_needed(0.0, sd=0.3, margin=0.05) == pytest.approx((za + zb) ** 2 * 0.09 / 0.0025)
    zb = sps.norm.ppf(0.8)
    assert items_needed(0.02, sd=0.3, margin=0.05) == pytest.approx((za + zb) ** 2 * 0.09 / 0.03**2)
    assert items_needed(0.05, sd=0.3, margin=0.05) is None
    assert items_needed(0.0, sd=0.0, margin=0.05) is None


def _binary(n: int, p: float, rng: np.random.Generator) -> list[list[float]]:
    return [[float(x)] for x in rng.random(n) < p]


def test_all_equal_large_is_consistent() -> None:
    rng = np.random.default_rng(0)
    ref = _binary(1000, 0.8, rng)
    c = paired_comparison(ref, target=ref, margin=0.05)
    assert c.verdict == "consistent"
    assert c.test == "mcnemar+tost"
    assert c.discordant == (0, 0)
    assert c.diff == 0.0 and c.p_value == 1.0
    assert c.diff_ci[0] < 0 < c.diff_ci[1]
    assert c.more_items_needed is None


def test_all_different_is_inconsistent() -> None:
    ref = [[1.0]] * 40
    tgt = [[0.0]] * 40
    c = paired_comparison(ref, target=tgt, margin=0.05)
    assert c.verdict == "inconsistent"
    assert c.diff == -1.0
    assert c.discordant == (0, 40)
    assert c.p_value == pytest.approx(2 * 0.5**40)
    assert c.diff_ci[1] < -0.05


def test_tiny_n_is_inconclusive_and_says_how_many_more() -> None:
    c = paired_comparison([[1.0], [0.0], [1.0]], target=[[1.0], [0.0], [1.0]], margin=0.05)
    assert c.verdict == "inconclusive"
    assert c.more_items_needed is not None and c.more_items_needed > 100
    single = paired_comparison([[1.0]], target=[[0.0]], margin=0.05)
    assert single.verdict == "inconclusive"


def test_more_items_estimate_is_about_right() -> None:
    # A true 0-point difference with 10 % discordance: the estimate from a small run
    # should be enough for a large run to pass.
    rng = np.random.default_rng(7)

    def run(n: int) -> tuple[list[list[float]], list[list[float]]]:
        ref = rng.random(n) < 0.7
        flip = rng.random(n) < 0.10
        return [[float(x)] for x in ref], [[float(x != f)] for x, f in zip(ref, flip, strict=True)]

    ref, tgt = run(120)
    small = paired_comparison(ref, target=tgt, margin=0.05)
    assert small.verdict == "inconclusive"
    assert small.more_items_needed is not None
    ref, tgt = run(120 + small.more_items_needed)
    # flips are symmetric in expectation, so the bigger run should usually decide
    assert paired_comparison(ref, target=tgt, margin=0.05).verdict in ("consistent", "inconclusive")


def test_k_samples_bootstrap_path() -> None:
    rng = np.random.default_rng(2)
    p = rng.random(600)
    ref = [[float(x) for x in rng.random(4) < pi] for pi in p]
    tgt = [[float(x) for x in rng.random(4) < pi] for pi in p]
    c = paired_comparison(ref, target=tgt, margin=0.05, resamples=1000)
    assert c.test == "bootstrap+tost"
    assert c.samples_per_item == 4
    assert c.verdict == "consistent"
    assert c.diff_ci[0] > -0.05 and c.diff_ci[1] < 0.05
    # Same inputs and seed give the same answer.
    assert paired_comparison(ref, target=tgt, margin=0.05, resamples=1000) == c
    worse = [[float(x) for x in rng.random(4) < max(0.0, pi - 0.3)] for pi in p]
    assert paired_comparison(ref, target=worse, margin=0.05, resamples=1000).verdict == "inconsistent"


def test_k_samples_tiny_equal_is_inconclusive_with_samples_estimate() -> None:
    ref = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    c = paired_comparison(ref, target=ref, margin=0.05, resamples=500)
    assert c.verdict == "inconclusive"
    assert c.more_items_needed is not None and c.more_items_needed > 0


def test_fractional_scores_use_bootstrap() -> None:
    ref = [[0.5], [0.25], [1.0], [0.0]] * 100
    c = paired_comparison(ref, target=ref, margin=0.05, resamples=500)
    assert c.test == "bootstrap+tost"
    assert c.verdict == "consistent"


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="items"):
        paired_comparison([[1.0]], target=[[1.0], [0.0]], margin=0.05)
    with pytest.raises(ValueError, match="no items"):
        paired_comparison([], target=[], margin=0.05)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        paired_comparison([[2.0]], target=[[1.0]], margin=0.05)
    with pytest.raises(ValueError, match="no samples"):
        paired_comparison([[]], target=[[1.0]], margin=0.05)


def test_equivalence_error_rate_at_the_margin() -> None:
    """With a true difference exactly at the margin, 'consistent' comes out at most about alpha of the time."""
    rng = np.random.default_rng(11)
    n, sims, hits = 400, 300, 0
    for _ in range(sims):
        ref = rng.random(n) < 0.7
        # target loses 5 points: 10 % of items flip right->wrong, 5 % wrong->right
        u = rng.random(n)
        tgt = np.where(ref, u >= 0.10 / 0.7 * 1.0, u < 0.05 / 0.3)
        c = paired_comparison([[float(x)] for x in ref], target=[[float(x)] for x in tgt], margin=0.05)
        hits += c.verdict == "consistent"
    assert hits / sims <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)
