"""DQM's interest-match term: old bundles rebuild without it, and it learns what the inner
product cannot.

Known-signal task: a candidate is clicked exactly when its category is among the user's
recent behaviours. The plain DQM sees the history only through the user tower's mean of
behaviour embeddings, so it can score "this category is near the user's average interest" but
not "this category is one of them"; the match term reads the candidate's cosine to each
behaviour and can. Both DQMs see the same batches, steps and seeds.
"""

from __future__ import annotations

import torch

from models.nn.config import DqmConfig
from models.nn.dqm import Dqm
from models.nn.registry import build_model, config_from_dict
from tests.test_nn_learning import _auc, _train
from tests.test_nn_support import category_of, random_batch, tiny_schema

SCHEMA = tiny_schema()
SMALL = DqmConfig(hidden=(16,), out_dim=8)


def test_a_dqm_bundle_from_before_interest_match_rebuilds_without_it():
    assert DqmConfig().interest_match
    old = config_from_dict("dqm", {"hidden": [16], "out_dim": 8})  # a manifest without the key
    assert not old.interest_match
    model = build_model("dqm", SCHEMA, {"hidden": [16], "out_dim": 8})
    assert model.match is None and model.match_weight is None
    # the weights such a bundle stores load strictly: no new parameter is expected of them
    torch.manual_seed(0)
    stored = Dqm(SCHEMA, DqmConfig(hidden=(16,), out_dim=8, interest_match=False)).state_dict()
    model.load_state_dict(stored)
    assert not any("match" in key for key in stored)
    new = build_model("dqm", SCHEMA, {"hidden": [16], "out_dim": 8, "interest_match": True})
    assert {"match.log_sharpness", "match_weight"} <= set(new.state_dict())


def test_match_term_is_the_weighted_interest_match_and_zero_without_history():
    torch.manual_seed(0)
    with_match = Dqm(SCHEMA, SMALL).eval()
    without = Dqm(SCHEMA, DqmConfig(hidden=(16,), out_dim=8, interest_match=False)).eval()
    without.load_state_dict(with_match.state_dict(), strict=False)
    with torch.no_grad():
        with_match.match_weight.copy_(torch.tensor([0.5, -2.0]))
    batch = random_batch(SCHEMA, size=12, min_len=1)
    batch["hist_ad_id"][:3] = 0
    batch["hist_category_id"][:3] = 0
    with torch.no_grad():
        match = with_match.interest_match(batch)
        diff = with_match(batch) - without(batch)
    assert match.shape == (12, 2) and match.abs().max() <= 1.0
    assert torch.equal(match[:3], torch.zeros(3, 2))  # empty history: no evidence either way
    assert torch.allclose(diff, match @ torch.tensor([0.5, -2.0]), atol=1e-6)
    assert diff[3:].abs().min() > 0


def _seen_category_task(size: int, seed: int) -> dict[str, torch.Tensor]:
    """Half the candidates share a category with one behaviour (another ad of it); click iff so."""
    gen = torch.Generator().manual_seed(seed)
    batch = random_batch(SCHEMA, size=size, length=8, seed=seed, min_len=1)
    hist_cat = batch["hist_category_id"]
    pick = torch.randint(0, 8, (size,), generator=gen) % (hist_cat != 0).sum(1)
    seen_cat = hist_cat.gather(1, pick.unsqueeze(1)).squeeze(1)
    seen_ad = (seen_cat - 1) + 20 * torch.randint(1, 10, (size,), generator=gen)
    use_seen = torch.rand(size, generator=gen) < 0.5
    batch["ad_id"] = torch.where(use_seen, seen_ad, batch["ad_id"])
    batch["category_id"] = category_of(batch["ad_id"])
    batch["click"] = (hist_cat == batch["category_id"].unsqueeze(1)).any(1).float()
    return batch


def _trained(config: DqmConfig, steps: int = 150) -> Dqm:
    torch.manual_seed(0)
    model = Dqm(SCHEMA, config)
    model.init_base_rates(0.5, 0.1)
    return _train(model, steps, batches=_seen_category_task)


def test_dqm_with_the_match_learns_a_click_the_inner_product_cannot_see():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended
    try:
        matched = _trained(DqmConfig(hidden=(32,), out_dim=16))
        plain = _trained(DqmConfig(hidden=(32,), out_dim=16, interest_match=False))
    finally:
        torch.set_num_threads(threads)
    test = _seen_category_task(2000, seed=999)
    assert 0.3 < test["click"].mean() < 0.7
    with torch.inference_mode():
        matched_auc = _auc(matched(test), test["click"])
        plain_auc = _auc(plain(test), test["click"])
    assert matched_auc > 0.9, matched_auc
    assert matched_auc > plain_auc + 0.1, (matched_auc, plain_auc)
