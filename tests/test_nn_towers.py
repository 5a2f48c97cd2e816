"""Two-tower retrieval and DQM pre-ranking: tower separation and exported vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.nn.config import DqmConfig, TwoTowerConfig
from models.nn.dqm import Dqm
from models.nn.two_tower import TwoTower, estimate_log_q
from tests.test_nn_support import random_batch, tiny_schema, with_extra_pads

USER = ("age_bucket", "gender", "hist_ad_id", "hist_category_id")
AD = ("ad_id", "category_id", "price_bucket")
SCENE = ("scene", "position")


def _only(batch, names):
    return {n: batch[n] for n in names}


def _two_tower() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(tiny_schema(), TwoTowerConfig(hidden=(16,), out_dim=8)).eval()


def test_towers_read_only_their_own_features():
    model = _two_tower()
    schema = tiny_schema()
    a, b = random_batch(schema, seed=1), random_batch(schema, seed=2)
    # Each tower runs on a dict holding only its own features: reading the other side's
    # features would raise a KeyError.
    assert torch.allclose(model.user_vector(_only(a, USER)), model.user_vector(a))
    mixed = {**_only(a, USER), **_only(b, AD)}
    assert torch.equal(model.user_vector(mixed), model.user_vector(a))
    mixed = {**_only(b, USER), **_only(a, AD)}
    assert torch.equal(model.ad_vector(mixed), model.ad_vector(_only(a, AD)))


def test_vectors_are_unit_length_and_logit_is_cosine_over_temperature():
    model = _two_tower()
    batch = random_batch(tiny_schema(), size=6)
    user, ad = model.user_vector(batch), model.ad_vector(batch)
    assert torch.allclose(user.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(ad.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(model(batch), (user * ad).sum(-1) / 0.05, atol=1e-4)


def test_user_vector_ignores_padding_and_survives_an_empty_history():
    model = _two_tower()
    batch = random_batch(tiny_schema(), size=6)
    assert torch.allclose(model.user_vector(batch),
                          model.user_vector(with_extra_pads(batch, 5)), atol=1e-6)
    batch["hist_ad_id"].zero_()
    batch["hist_category_id"].zero_()
    assert torch.isfinite(model.user_vector(batch)).all()


def test_new_ad_gets_a_vector_from_its_features_alone():
    model = _two_tower()
    new_ad = {"ad_id": torch.tensor([199]), "category_id": torch.tensor([4]),
              "price_bucket": torch.tensor([3])}
    vec = model.ad_vector(new_ad)
    assert vec.shape == (1, 8) and torch.isfinite(vec).all()


def test_in_batch_loss_applies_log_q_and_drops_duplicate_negatives():
    model = _two_tower()
    batch = random_batch(tiny_schema(), size=5)
    batch["ad_id"] = torch.tensor([10, 11, 12, 10, 13])
    log_q = torch.log(torch.tensor([0.4, 0.1, 0.1, 0.4, 0.2]))
    logits = model.user_vector(batch) @ model.ad_vector(batch).T / 0.05 - log_q
    logits[0, 3] = logits[3, 0] = float("-inf")  # same ad: not a negative of itself
    expected = F.cross_entropy(logits, torch.arange(5))
    assert torch.allclose(model.in_batch_loss(batch, log_q), expected, atol=1e-5)
    uncorrected = model.in_batch_loss(batch)
    assert not torch.allclose(uncorrected, expected)
    assert torch.allclose(model.training_loss({**batch, "log_q": log_q}), expected, atol=1e-5)


def test_estimate_log_q_is_the_log_frequency_of_positives():
    table = estimate_log_q(torch.tensor([3, 3, 3, 5]), num_rows=8)
    assert torch.allclose(table[3], torch.log(torch.tensor(0.75)))
    assert torch.allclose(table[5], torch.log(torch.tensor(0.25)))
    assert torch.isfinite(table).all()


def _dqm(ad_bias: bool = True) -> Dqm:
    """The inner-product part alone; the interest-match term is tested in test_nn_dqm.py and
    test_prerank.py."""
    torch.manual_seed(0)
    model = Dqm(tiny_schema(), DqmConfig(hidden=(16,), out_dim=8, ad_bias=ad_bias,
                                         interest_match=False))
    if ad_bias:
        with torch.no_grad():
            model.global_bias.fill_(-2.0)
    return model.eval()


def test_dqm_score_equals_inner_products_of_exported_vectors():
    for ad_bias in (True, False):
        model = _dqm(ad_bias)
        batch = random_batch(tiny_schema(), size=12)
        u = model.user_vector(_only(batch, USER))
        s = model.scene_vector(_only(batch, SCENE))
        a = model.ad_vector(_only(batch, AD))
        assert a.shape == (12, 8 + int(ad_bias))
        expected = (u * a).sum(-1) + (s * a).sum(-1)
        assert torch.allclose(model(batch), expected, atol=1e-5)


def test_dqm_serving_scores_a_candidate_matrix_with_one_product():
    model = _dqm()
    schema = tiny_schema()
    request = random_batch(schema, size=1, seed=4)
    cands = random_batch(schema, size=50, seed=5)
    ad_matrix = model.ad_vector(_only(cands, AD))  # precomputed in the bundle
    query = model.user_vector(_only(request, USER)) + model.scene_vector(_only(request, SCENE))
    served = Dqm.score(query, ad_matrix)
    expanded = {**{k: request[k].expand(50, *request[k].shape[1:]) for k in USER + SCENE},
                **_only(cands, AD)}
    assert torch.allclose(served, model(expanded), atol=1e-5)


def test_dqm_bias_dimension_counts_once():
    model = _dqm()
    batch = random_batch(tiny_schema(), size=3)
    assert torch.all(model.user_vector(batch)[:, -1] == 1.0)
    assert torch.all(model.scene_vector(batch)[:, -1] == 0.0)
