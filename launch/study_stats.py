"""Statistics of the pretrained study (issue 33), standard library only: no agvm_ds, no scipy.

What MLPerf's RCP checker does (mlcommons/logging, ``mlperf_logging/rcp_checker``), and what
is taken from it here:

* a run's result is its **epochs to converge**: the epoch of the first evaluation that reaches
  the benchmark's fixed, absolute quality target; a run that never reaches it is marked
  infinite, and a submission set with more than one such run is rejected;
* a set of runs is summarized by its **olympic mean**: sort, drop the fastest and the slowest
  run, average the rest (its stdev is numpy's, ddof 0);
* the check is a **one-sided two-sample t-test** (Student's, pooled variance, from the olympic
  means and stdevs) at alpha 0.05 of "the submission converges faster than the reference":
  the checker binary-searches the smallest mean epochs that test would not reject.

Here the question is the other way round ("does AGVM converge in fewer epochs / reach a
higher AP than plain at the same batch?") and both samples are small (2-5 seeds), so:

* final AP: **Welch's one-sided t-test** (no equal-variance assumption; the t distribution's
  CDF from the regularized incomplete beta function, below) and, beside it, an exact
  **permutation test** of the difference of means (every relabelling of the pooled seeds);
* epochs to target: runs that never reach the target are **censored at the last evaluated
  epoch**. Every run of a cell has the same evaluations, so a censored run is known to be
  slower than every run that reached the target, and tied with the other censored runs; the
  test is an exact permutation test of the Mann-Whitney statistic (the probability that an
  AGVM run is faster than a plain run, ties counting one half), which needs nothing more.
  The olympic mean of a cell with one censored run drops it as its slowest (MLPerf's
  allowance); with two or more it is undefined and reported as such.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Callable, Optional, Sequence

#: a relabelling test enumerates every split up to this many; above, it samples this many
EXACT_LIMIT = 200_000


def olympic(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample sd, runs kept) after dropping the smallest and the largest value; with
    fewer than 3 values nothing is dropped. ``inf`` values (censored runs) are allowed only
    where they are dropped (one, the largest); otherwise the mean is ``inf``."""
    vals = sorted(values)
    kept = vals[1:-1] if len(vals) >= 3 else vals
    if not kept:
        return float("nan"), float("nan"), 0
    if any(math.isinf(v) for v in kept):
        return float("inf"), float("nan"), len(kept)
    sd = statistics.stdev(kept) if len(kept) >= 2 else float("nan")
    return statistics.fmean(kept), sd, len(kept)


def epochs_to_target(history: Sequence[tuple[float, float]], target: float) -> tuple[Optional[float], float]:
    """(epoch of the first evaluation with AP >= target or None when never reached, the last
    evaluated epoch: where a run that never reached the target is censored)."""
    ordered = sorted(history)
    last = ordered[-1][0] if ordered else float("nan")
    for epoch, ap in ordered:
        if math.isfinite(ap) and ap >= target:
            return epoch, last
    return None, last


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry beyond
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def welch_greater(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t-test of H1: mean(a) > mean(b). Returns (t, Welch-Satterthwaite df, one-sided
    p); NaNs where a sample has fewer than 2 values or both have zero variance."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan"), float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return float("nan"), float("nan"), float("nan")
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, t_sf(t, df)


def mean_difference(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.fmean(a) - statistics.fmean(b)


def prob_smaller(a: Sequence[float], b: Sequence[float]) -> float:
    """Mann-Whitney's P(A < B) + P(A = B) / 2 over all pairs; ``inf`` (censored) ties with ``inf``."""
    score = sum(1.0 if x < y else 0.5 if x == y else 0.0 for x in a for y in b)
    return score / (len(a) * len(b))


def permutation_greater(a: Sequence[float], b: Sequence[float],
                        statistic: Callable[[Sequence[float], Sequence[float]], float] = mean_difference,
                        samples: int = EXACT_LIMIT, seed: int = 0) -> float:
    """One-sided permutation p-value of H1: statistic(a, b) is large. Every split of the pooled
    values into groups of len(a) and len(b) is scored (sampled, ``samples`` of them with a
    seeded generator, when there are more than EXACT_LIMIT); p = share of splits scoring at
    least the observed (the observed split included, so p > 0)."""
    if not a or not b:
        return float("nan")
    pooled, k = list(a) + list(b), len(a)
    observed = statistic(a, b)
    slack = 1e-12 * max(1.0, abs(observed)) if math.isfinite(observed) else 0.0
    n = len(pooled)
    if math.comb(n, k) <= EXACT_LIMIT:
        splits = itertools.combinations(range(n), k)
        total = math.comb(n, k)
    else:
        rng = random.Random(seed)
        splits = (rng.sample(range(n), k) for _ in range(samples))
        total = samples
    hits = 0
    for idx in splits:
        chosen = set(idx)
        xa = [pooled[i] for i in idx]
        xb = [pooled[i] for i in range(n) if i not in chosen]
        hits += statistic(xa, xb) >= observed - slack
    return hits / total


def gap_closed(ref: Sequence[float], plain: Sequence[float], agvm: Sequence[float],
               resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Share of the large-batch loss AGVM wins back, (mean(agvm) - mean(plain)) /
    (mean(ref) - mean(plain)), with a 95 % percentile bootstrap interval (seeds resampled
    within each of the three groups; resamples whose gap is <= 0 are left out). NaNs when
    the observed gap is not positive."""
    gap = statistics.fmean(ref) - statistics.fmean(plain)
    if not gap > 0:
        return float("nan"), float("nan"), float("nan")
    point = (statistics.fmean(agvm) - statistics.fmean(plain)) / gap
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        r, p, g = ([rng.choice(s) for _ in s] for s in (ref, plain, agvm))
        d = statistics.fmean(r) - statistics.fmean(p)
        if d > 0:
            draws.append((statistics.fmean(g) - statistics.fmean(p)) / d)
    if not draws:
        return point, float("nan"), float("nan")
    draws.sort()
    lo = draws[int(0.025 * (len(draws) - 1))]
    hi = draws[int(math.ceil(0.975 * (len(draws) - 1)))]
    return point, lo, hi
