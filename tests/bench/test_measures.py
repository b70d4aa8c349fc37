"""Honesty checks of the measures on hand-made result tables, against closed forms."""

import math

import numpy as np
import pytest

from steepest.bench import measures as M

INF = math.inf


def test_time_to_target_is_median_over_studies_of_best_trial():
    assert M.time_to_target({0: [300, 100, None], 1: [200, INF], 2: [50, 400]}) == 100
    assert M.time_to_target({0: [None, None], 1: [10]}) == INF  # median of (inf, 10) with two studies
    assert M.time_to_target({0: [None], 1: [10], 2: [20]}) == 20
    assert M.time_to_target({}) == INF


def test_ratios_profiles_and_score_closed_form():
    times = {"a": {"w1": 100, "w2": 200, "w3": INF},
             "b": {"w1": 200, "w2": 100, "w3": 300},
             "c": {"w1": 500, "w2": 150, "w3": INF}}
    r = M.performance_ratios(times)
    assert r["a"] == {"w1": 1.0, "w2": 2.0, "w3": INF}
    assert r["b"] == {"w1": 2.0, "w2": 1.0, "w3": 1.0}
    assert r["c"] == {"w1": INF, "w2": 1.5, "w3": INF}  # 5 > 4 counts as failure
    prof = M.performance_profile(r, [1.0, 1.5, 2.0, 4.0])
    np.testing.assert_allclose(prof["a"], [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prof["b"], [2 / 3, 2 / 3, 1.0, 1.0])
    np.testing.assert_allclose(prof["c"], [0, 1 / 3, 1 / 3, 1 / 3])
    s = M.algoperf_score(r)
    # closed form: mean over workloads of (4 - r) / 3 for r <= 4
    assert s["a"] == pytest.approx(((4 - 1) / 3 + (4 - 2) / 3 + 0) / 3)
    assert s["b"] == pytest.approx(((4 - 2) / 3 + 1 + 1) / 3)
    assert s["c"] == pytest.approx((0 + (4 - 1.5) / 3 + 0) / 3)
    # and equals the normalized integral of the profile, numerically
    taus = np.linspace(1, 4, 300001)
    for o, prof_o in M.performance_profile(r, taus).items():
        assert np.trapezoid(prof_o, taus) / 3 == pytest.approx(s[o], abs=1e-4)


def test_nobody_reaches_means_nobody_scores():
    r = M.performance_ratios({"a": {"w": INF}, "b": {"w": INF}})
    assert r == {"a": {"w": INF}, "b": {"w": INF}}
    assert M.algoperf_score(r) == {"a": 0.0, "b": 0.0}


def test_geomean_speedup_vs_baseline():
    times = {"adamw": {"w1": 100, "w2": 400, "w3": INF}, "x": {"w1": 50, "w2": 100, "w3": 10}}
    sp = M.geomean_speedup(times, "adamw")
    assert sp["adamw"] == (1.0, 2)
    assert sp["x"][0] == pytest.approx(math.sqrt(2 * 4)) and sp["x"][1] == 2
    assert math.isnan(M.geomean_speedup({"x": {"w": 1}}, "adamw")["x"][0])
