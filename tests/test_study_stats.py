"""The pretrained study's statistics (launch/study_stats.py) against independent references:
numeric integration of Student's t density, brute-force enumeration of every relabelling
(itertools.permutations, not combinations), a float64 numpy olympic mean, and hand-made
learning curves with and without censoring."""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import study_stats as st  # noqa: E402


def _t_density(x: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x * x / df) ** (-(df + 1) / 2)


def _t_sf_by_integration(t: float, df: float) -> float:
    """P(T > t) = 1/2 - integral_0^t density (t >= 0), Simpson's rule on 20 000 intervals."""
    x = np.linspace(0.0, abs(t), 20_001)
    y = np.array([_t_density(v, df) for v in x])
    h = x[1] - x[0]
    integral = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return 0.5 - integral if t >= 0 else 0.5 + integral


@pytest.mark.parametrize("t,df", [(0.0, 3), (0.7, 1), (1.5, 2.5), (2.1, 4.3), (-1.2, 7), (3.9, 12.0), (6.0, 30)])
def test_t_tail_against_numeric_integration_of_the_density(t, df):
    assert st.t_sf(t, df) == pytest.approx(_t_sf_by_integration(t, df), abs=1e-9)


def test_welch_against_hand_formula_and_integration():
    a, b = [0.31, 0.35, 0.29, 0.40, 0.33], [0.28, 0.30, 0.26]
    ma, mb = np.mean(a), np.mean(b)
    va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 3
    t_ref = (ma - mb) / math.sqrt(va + vb)
    df_ref = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 2)
    t, df, p = st.welch_greater(a, b)
    assert t == pytest.approx(t_ref, rel=1e-12) and df == pytest.approx(df_ref, rel=1e-12)
    assert p == pytest.approx(_t_sf_by_integration(t_ref, df_ref), abs=1e-9)
    print(f"\nWelch: t={t:.4f} df={df:.3f} one-sided p={p:.5f}")
    assert 0.0 < p < 0.05  # a clearly larger mean is significant one-sided ...
    assert st.welch_greater(b, a)[2] == pytest.approx(1 - p, abs=1e-12)  # ... and not the other way
    assert all(math.isnan(v) for v in st.welch_greater([1.0], [0.5, 0.6]))


def _brute_force_permutation_p(a, b, statistic):
    """Every ordering of the pooled values (n! of them), first len(a) are group A."""
    pooled, k = list(a) + list(b), len(a)
    observed = statistic(a, b)
    hits = total = 0
    for perm in itertools.permutations(pooled):
        total += 1
        hits += statistic(list(perm[:k]), list(perm[k:])) >= observed - 1e-12
    return hits / total


@pytest.mark.parametrize("a,b", [([0.42, 0.45, 0.44], [0.40, 0.41, 0.43, 0.39]),
                                 ([0.30, 0.31], [0.33, 0.29, 0.30]),
                                 ([1.0, 1.0, 2.0], [1.0, 2.0, 2.0])])
def test_permutation_of_means_against_enumerating_every_ordering(a, b):
    p = st.permutation_greater(a, b)
    assert p == pytest.approx(_brute_force_permutation_p(a, b, st.mean_difference), abs=1e-12)


def test_censored_epochs_test_against_enumeration():
    inf = math.inf
    agvm, plain = [3.0, 4.0, 4.0, inf], [5.0, inf, inf]  # AGVM mostly faster, censored runs tie
    p = st.permutation_greater(agvm, plain, statistic=st.prob_smaller)
    ref = _brute_force_permutation_p(agvm, plain, st.prob_smaller)
    print(f"\ncensored epochs-to-target permutation p={p:.4f} (enumeration {ref:.4f})")
    assert p == pytest.approx(ref, abs=1e-12) and p < 0.2
    # the statistic: pairs (a < b) + ties / 2, by hand: 3,4,4 beat all 3 plain (9);
    # inf loses to 5 and ties the two infs (2 x 0.5) -> 10 / 12
    assert st.prob_smaller(agvm, plain) == pytest.approx(10 / 12)


def test_sampled_permutation_is_close_to_exact_when_there_are_too_many_splits(monkeypatch):
    rng = random.Random(3)
    a = [rng.gauss(0.3, 0.05) for _ in range(6)]
    b = [rng.gauss(0.25, 0.05) for _ in range(6)]
    exact = st.permutation_greater(a, b)  # C(12, 6) = 924 splits, enumerated
    monkeypatch.setattr(st, "EXACT_LIMIT", 100)
    sampled = st.permutation_greater(a, b, samples=20_000, seed=1)
    assert abs(sampled - exact) < 0.01


def test_olympic_mean_against_numpy():
    vals = [0.61, 0.67, 0.63, 0.64, 0.613]
    s = np.sort(np.array(vals, dtype=np.float64))[1:-1]
    mean, sd, kept = st.olympic(vals)
    assert kept == 3 and mean == pytest.approx(s.mean(), rel=1e-14)
    assert sd == pytest.approx(s.std(ddof=1), rel=1e-12)
    # one censored run is the slowest and is dropped (MLPerf's allowance); two are not
    assert st.olympic([4.0, 5.0, 6.0, math.inf])[0] == pytest.approx(5.5)
    assert math.isinf(st.olympic([4.0, 5.0, math.inf, math.inf])[0])
    assert st.olympic([2.0, 4.0])[:2] == (3.0, pytest.approx(math.sqrt(2)))  # < 3 runs: none dropped


def test_epochs_to_target_with_censoring_on_synthetic_curves():
    def curve(rate, epochs=8, ceiling=0.5):
        return [(e, ceiling * (1 - math.exp(-rate * e))) for e in range(1, epochs + 1)]

    target = 0.99 * 0.45
    # the first epoch whose AP >= target, found by a plain loop as the reference
    for rate in (0.3, 0.5, 0.9, 2.0):
        hist = curve(rate)
        ref = next((e for e, ap in hist if ap >= target), None)
        got, last = st.epochs_to_target(list(reversed(hist)), target)  # order does not matter
        assert got == ref and last == 8
    assert st.epochs_to_target(curve(0.3), target) == (8, 8)  # 0.5 (1 - e^-2.4) = 0.4546 >= 0.4455 only at 8
    assert st.epochs_to_target(curve(0.05), target) == (None, 8)  # far too slow: censored at 8


def test_gap_closed_point_and_interval():
    ref, plain, agvm = [0.50, 0.52, 0.48], [0.30, 0.31, 0.29], [0.40, 0.41, 0.39]
    point, lo, hi = st.gap_closed(ref, plain, agvm)
    assert point == pytest.approx((0.40 - 0.30) / (0.50 - 0.30))
    assert lo <= point <= hi and 0.0 < lo and hi < 1.0
    assert st.gap_closed([0.5, 0.5], [0.3, 0.3], [0.4, 0.4]) == pytest.approx((0.5, 0.5, 0.5))
    assert all(math.isnan(v) for v in st.gap_closed([0.3], [0.4], [0.5]))  # no gap: nothing to close
