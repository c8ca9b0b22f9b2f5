"""The statistics of every gate: accuracy (paired and unpaired) and throughput, on scipy and statsmodels.

Pure functions on numbers; no files, no lm-eval.  Scores are fractions here (0.9 means
90 %); the gate converts to percentage points.  The tests themselves come from
well-kept libraries: ``scipy.stats`` (``binomtest`` for Wilson intervals, ``bootstrap``,
the normal distribution) and ``statsmodels`` (``mcnemar``, ``tost_proportions_2indep``
and the two-sample proportion tests and intervals).

**Paired accuracy** (:func:`paired_comparison`, a target and a reference item by item):

* binary scores with one sample per item (the usual ``exact_match`` / ``acc``): the
  paired 2x2 table, McNemar's exact test (statsmodels) for "any difference", and the
  Agresti-Min interval (0.5 added to each cell) for the difference, which behaves well
  even when no item disagrees; its two one-sided z-tests are the TOST;
* anything else (``k`` samples per item, or fractional scores): the ``k`` samples of an
  item are averaged and the items' differences are resampled by ``scipy.stats.bootstrap``
  (percentile), with one pseudo-item at each of +1, -1 and 0 -- the Agresti-Min idea on
  the difference scale -- so that a handful of identical items never proves equivalence;
  the TOST and "any difference" p-values are read off the bootstrap distribution.

Equivalence is two one-sided tests (TOST) against ``margin`` at level ``alpha``, which is
the same as the ``1 - 2 alpha`` interval of the difference lying inside ``(-margin,
margin)``; "inconsistent" is the mirror image, the interval lying wholly beyond the
margin.  Anything else is inconclusive, and the comparison estimates how many more items
(or samples per item) would decide it.

**Unpaired accuracy** (:func:`unpaired_comparison`, a reference known only by its
published score and item count): statsmodels' two-independent-proportions TOST
(Agresti-Caffo), with the power it has to show equivalence when the two are equal.

**FlagRelease's relative rule** (:func:`relative_verdict`): a drop of at most a given
percent of the reference passes; a larger one fails, except in the small-sample noise
zone (a gap of a couple of items on a small benchmark), which means retest.

**Throughput** (:func:`ratio_comparison`): mean(A) / mean(B) over interleaved rounds,
with a paired ``scipy.stats.bootstrap`` interval over rounds, expanded for few rounds
(Hesterberg's expanded percentile interval), against a minimum ratio: pass, fail or
inconclusive, like the accuracy verdicts.
"""

from __future__ import annotations

from flagrelease.gate._accuracy import (
    PairedComparison,
    UnpairedComparison,
    Verdict,
    paired_comparison,
    relative_verdict,
    unpaired_comparison,
)
from flagrelease.gate._ratio import RatioComparison, ThroughputVerdict, ratio_comparison
from flagrelease.gate._stats_base import (
    agresti_min_interval,
    binomial_cdf,
    bootstrap_ci,
    bootstrap_means,
    items_needed,
    mcnemar_exact,
    score_interval,
    tost_normal,
    tost_power,
    wilson_interval,
)

__all__ = [
    "PairedComparison",
    "RatioComparison",
    "ThroughputVerdict",
    "UnpairedComparison",
    "Verdict",
    "agresti_min_interval",
    "binomial_cdf",
    "bootstrap_ci",
    "bootstrap_means",
    "items_needed",
    "mcnemar_exact",
    "paired_comparison",
    "ratio_comparison",
    "relative_verdict",
    "score_interval",
    "tost_normal",
    "tost_power",
    "unpaired_comparison",
    "wilson_interval",
]
