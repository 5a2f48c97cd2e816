"""Qscore: a fitted Beta prior gives new ads the prior mean and shrinks young ads toward it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.nn.qscore import Qscore


def _catalog(seed: int = 0, ads: int = 3000, alpha: float = 2.0, beta: float = 98.0):
    rng = np.random.default_rng(seed)
    ctr = rng.beta(alpha, beta, size=ads)
    impressions = rng.poisson(400, size=ads)
    clicks = rng.binomial(impressions, ctr)
    return impressions, clicks


def test_fit_recovers_the_catalog_prior():
    q = Qscore.fit(*_catalog())
    assert q.prior_mean == pytest.approx(0.02, rel=0.08)
    assert q.alpha + q.beta == pytest.approx(100.0, rel=0.35)


def test_new_ad_gets_the_prior_mean_not_zero_or_one():
    q = Qscore.fit(*_catalog())
    assert q.score(0, 0) == pytest.approx(q.prior_mean)
    assert 0.0 < q.score(0, 0) < 1.0


def test_young_ads_shrink_toward_the_prior_and_old_ads_keep_their_rate():
    q = Qscore.fit(*_catalog())
    lucky_young = q.score(3, 1)  # raw CTR 33%
    assert q.prior_mean < lucky_young < 0.05
    veteran = q.score(100_000, 5_000)  # raw CTR 5%
    assert veteran == pytest.approx(0.05, rel=0.01)
    scores = q.score(np.array([0, 10, 1000]), np.array([0, 0, 0]))
    assert scores.dtype == np.float64
    assert scores[0] > scores[1] > scores[2] > 0


def test_degenerate_catalogs_still_give_a_usable_prior():
    for impressions, clicks in (([], []), ([100, 200], [0, 0]), ([50, 50, 50], [1, 1, 1])):
        q = Qscore.fit(impressions, clicks)
        assert 0.0 < q.prior_mean < 0.5
        assert np.isfinite(q.score(0, 0))


def test_round_trips_through_json_and_refuses_bad_input():
    q = Qscore.fit(*_catalog())
    again = Qscore.from_dict(json.loads(json.dumps(q.to_dict())))
    assert again == q
    with pytest.raises(ValueError, match="alpha"):
        Qscore.from_dict({"kind": "beta_prior_ctr", "alpha": -1, "beta": 1})
    with pytest.raises(ValueError, match="clicks"):
        Qscore.fit([10], [11])
