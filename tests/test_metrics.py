"""Metrics against hand-worked values and scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from models.train.metrics import auc, calibration, gauc, logloss, recall_at_k, spearman


def test_auc_hand_worked():
    # positives at 0.8 and 0.4; negatives at 0.6, 0.2: pairs won 2 + 1 of 4
    assert auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    assert auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auc([1, 0], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert math.isnan(auc([1, 1], [0.1, 0.2]))


def test_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.1
    s = np.round(rng.random(5000) + 0.5 * y, 1)  # coarse scores: many ties
    u = stats.mannwhitneyu(s[y], s[~y]).statistic
    assert auc(y, s) == pytest.approx(u / (y.sum() * (~y).sum()), abs=1e-12)


def test_gauc_hand_worked_weights_by_impressions_and_skips_single_class():
    labels = [1, 0, 0, 1, 0, 1, 1, 0, 0, 0]
    scores = [0.9, 0.1, 0.5, 0.2, 0.3, 0.9, 0.8, 0.1, 0.2, 0.3]
    users = [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    # user 1: AUC 1 (3 rows); user 2: AUC 0 (2 rows); user 3 and 4 single-class: skipped
    assert gauc(labels, scores, users) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_gauc_equals_loop_reference(seed: int):
    rng = np.random.default_rng(seed)
    n = 400
    groups = rng.integers(0, 25, n)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.random(n), 1)
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        a = auc(labels[m], scores[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
    expected = num / den if den else math.nan
    got = gauc(labels, scores, groups)
    assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected)


def test_logloss_and_calibration_hand_worked():
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, finite
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(1)
    a = np.round(rng.random(1000), 2)
    b = a + rng.normal(0, 0.3, 1000)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_recall_at_k_counts_pairs_found_in_their_own_top_k():
    retrieved = np.array([[5, 7, 9, -1], [1, 2, 3, 4]])
    query = np.array([0, 0, 1, 1])
    item = np.array([7, 1, 4, 1])
    # query 0: 7 at rank 2 (hit for k>=2), 1 not retrieved; query 1: 4 at rank 4, 1 at rank 1
    assert recall_at_k(retrieved, query, item, k=1) == pytest.approx(1 / 4)
    assert recall_at_k(retrieved, query, item, k=2) == pytest.approx(2 / 4)
    assert recall_at_k(retrieved, query, item, k=4) == pytest.approx(3 / 4)
    assert recall_at_k(retrieved, query, item, k=2, block_rows=1) == pytest.approx(2 / 4)


def test_gauc_is_fast_on_millions_of_rows():
    import time

    rng = np.random.default_rng(2)
    n = 2_000_000
    started = time.perf_counter()
    value = gauc(rng.random(n) < 0.03, rng.random(n), rng.integers(0, 50_000, n))
    assert time.perf_counter() - started < 10
    assert 0.45 < value < 0.55
