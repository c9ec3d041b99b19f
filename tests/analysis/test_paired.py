"""Paired held-out comparisons: the sign test against scipy, the bootstrap interval against
the normal approximation, symmetry and closed-form cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.analysis.paired import compare, sign_test


@pytest.mark.parametrize("wins,losses", [(0, 0), (1, 0), (9, 3), (3, 9), (12, 12), (30, 10), (305, 1), (0, 60)])
def test_sign_test_equals_scipy_binomtest(wins, losses):
    stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_identical_models_differ_by_nothing():
    items = {"a": [1.0, 0.0, 1.0], "b": [0.0, 0.0]}
    paired = compare(items, items)
    assert (paired.difference, paired.low, paired.high, paired.wins, paired.losses, paired.p_value) == (
        0.0, 0.0, 0.0, 0, 0, 1.0)


def test_difference_is_the_mean_over_metrics_of_each_metrics_item_mean():
    """Metrics weigh equally whatever their item counts (the held-out table's mean skill)."""
    model = {"a": [1, 1, 0, 0], "b": [1, 0]}
    reference = {"a": [0, 1, 0, 1], "b": [0, 0]}
    paired = compare(model, reference, labels=("trial 3", "ties"))
    assert paired.difference == pytest.approx((0 / 4 + 1 / 2) / 2)
    assert (paired.wins, paired.losses, paired.model, paired.reference) == (2, 1, "trial 3", "ties")
    assert paired.p_value == sign_test(2, 1) == 1.0


def test_bootstrap_interval_matches_the_normal_approximation_for_many_items():
    """For a mean of n independent differences, the bootstrap interval is ≈ mean ± 1.96·σ/√n.
    Tolerance 5% of the half-width: the 2.5th/97.5th percentiles of 10,000 draws carry ~2%
    Monte Carlo error, and the binomial skew at n = 800 moves them by less than 1%."""
    rng = np.random.default_rng(1)
    model = {"x": list(rng.random(800) < 0.6), "y": list(rng.random(400) < 0.5)}
    reference = {"x": list(rng.random(800) < 0.5), "y": list(rng.random(400) < 0.5)}
    paired = compare(model, reference)
    sigma = math.sqrt(sum(np.var(np.subtract(model[k], reference[k], dtype=float)) / len(model[k])
                          for k in model)) / 2  # the mean of two independent metric means
    for bound, expected in ((paired.low, paired.difference - 1.96 * sigma),
                            (paired.high, paired.difference + 1.96 * sigma)):
        assert bound == pytest.approx(expected, abs=0.05 * 1.96 * sigma)


def test_the_interval_keeps_the_items_paired():
    """Two models that differ on 10 of 400 items: paired, the gain is clear (an unpaired
    interval, σ ≈ √(2·¼/400) ≈ 0.035, would straddle 0)."""
    rng = np.random.default_rng(2)
    reference = (rng.random(400) < 0.5).astype(float)
    model = reference.copy()
    model[np.flatnonzero(reference == 0)[:10]] = 1
    paired = compare({"skill": list(model)}, {"skill": list(reference)})
    assert paired.difference == 10 / 400 and (paired.wins, paired.losses) == (10, 0)
    assert 0.005 < paired.low < paired.difference < paired.high < 0.045
    assert paired.p_value == pytest.approx(2 / 2**10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40),
       st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=40))
def test_swapping_the_two_models_mirrors_the_result(binary, graded):
    one = {"binary": [a for a, _ in binary], "graded": [a for a, _ in graded]}
    two = {"binary": [b for _, b in binary], "graded": [b for _, b in graded]}
    forward, backward = compare(one, two, resamples=500), compare(two, one, resamples=500)
    assert backward.difference == pytest.approx(-forward.difference, abs=1e-12)
    assert (backward.low, backward.high) == pytest.approx((-forward.high, -forward.low), abs=1e-12)
    assert (backward.wins, backward.losses) == (forward.losses, forward.wins)
    assert backward.p_value == forward.p_value
    assert forward.low <= forward.high


@pytest.mark.parametrize("model,reference,match", [
    ({"a": [1.0]}, {"b": [1.0]}, "same metrics"),
    ({}, {}, "same metrics"),
    ({"a": [1.0, 0.0]}, {"a": [1.0]}, "metric 'a'"),
    ({"a": []}, {"a": []}, "non-empty"),
])
def test_mismatched_items_are_refused(model, reference, match):
    with pytest.raises(ValueError, match=match):
        compare(model, reference)
