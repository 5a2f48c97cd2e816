"""DIN+ESMM: padding, batch independence, ESMM gradients, the decomposed serving path."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from models.nn.config import RankerConfig
from models.nn.din_esmm import DinEsmm, clicked_cvr_loss, esmm_losses
from tests.test_nn_support import random_batch, rows, tiny_schema, with_extra_pads

DENSE = RankerConfig(attention_hidden=(8, 4), tower_hidden=(16, 8), sparse_embeddings=False,
                     cvr_click_weight=0.0)  # pure ESMM
MATCH = RankerConfig(attention_hidden=(8, 4), tower_hidden=(16, 8), sparse_embeddings=False,
                     interest_match=True)


def _model(config: RankerConfig = DENSE, seed: int = 0) -> DinEsmm:
    """A model whose Dice layers have non-trivial running statistics, in eval mode."""
    torch.manual_seed(seed)
    schema = tiny_schema()
    model = DinEsmm(schema, config)
    model.train()
    with torch.no_grad():
        for step in range(5):
            model(random_batch(schema, size=32, seed=100 + step))
    return model.eval()


def test_outputs_are_consistent_probabilities():
    model = _model()
    out = model(random_batch(tiny_schema(), size=16))
    for key in ("pctr", "pcvr", "pctcvr"):
        assert out[key].shape == (16,)
        assert torch.all((out[key] > 0) & (out[key] < 1))
    assert torch.allclose(out["pctcvr"], out["pctr"] * out["pcvr"])
    assert torch.allclose(out["pctr"], torch.sigmoid(out["ctr_logit"]))


def test_adding_pads_changes_no_score_in_eval_and_training():
    batch = random_batch(tiny_schema(), size=16, length=6)
    padded = with_extra_pads(batch, 9)
    for model, train in ((m, t) for m in (_model(), _model(MATCH)) for t in (False, True)):
        model.train(train)
        torch.manual_seed(0)
        a = model(batch)["pctcvr"]
        torch.manual_seed(0)
        b = model(padded)["pctcvr"]
        assert torch.allclose(a, b, atol=1e-6)


def test_eval_scores_do_not_depend_on_batch_neighbours():
    model = _model()
    batch = random_batch(tiny_schema(), size=16)
    full = model(batch)["pctr"]
    singles = torch.cat([model(rows(batch, torch.tensor([i])))["pctr"] for i in range(16)])
    reordered = model(rows(batch, torch.arange(15, -1, -1)))["pctr"].flip(0)
    assert torch.allclose(full, singles, atol=1e-6)
    assert torch.allclose(full, reordered, atol=1e-6)


def test_empty_history_gives_finite_scores():
    schema = tiny_schema()
    batch = random_batch(schema, size=4)
    batch["hist_ad_id"].zero_()
    batch["hist_category_id"].zero_()
    for model in (_model(), _model().train(), _model(MATCH), _model(MATCH).train()):
        out = model(batch)
        assert all(torch.isfinite(v).all() for v in out.values())
        assert torch.isfinite(model.loss(out, batch["click"], batch["conversion"]))
    match = _model(MATCH).backbone
    feats = match(batch)
    assert torch.equal(feats[:, -2:], torch.zeros(4, 2))  # no history: no evidence either way


def test_esmm_loss_matches_the_formula_and_stays_finite_when_saturated():
    ctr_logit = torch.tensor([-2.0, 0.5, 1.0, -0.3])
    cvr_logit = torch.tensor([0.2, -1.0, 2.0, 0.0])
    click = torch.tensor([0.0, 1.0, 1.0, 0.0])
    conv = torch.tensor([0.0, 0.0, 1.0, 0.0])
    parts = esmm_losses(ctr_logit, cvr_logit, click, conv)
    pctcvr = torch.sigmoid(ctr_logit) * torch.sigmoid(cvr_logit)
    assert torch.allclose(parts["ctr"], F.binary_cross_entropy(torch.sigmoid(ctr_logit), click))
    assert torch.allclose(parts["ctcvr"], F.binary_cross_entropy(pctcvr, click * conv))
    huge = torch.tensor([60.0, -60.0], requires_grad=True)
    loss = esmm_losses(huge, huge.detach() * 1.0, torch.tensor([0.0, 1.0]), torch.ones(2))
    total = loss["ctr"] + loss["ctcvr"]
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(huge.grad).all()


def _grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def test_cvr_tower_learns_only_through_the_product_and_embeddings_from_both_losses():
    model = _model().train()
    batch = random_batch(tiny_schema(), size=32, seed=3)
    out = model(batch)
    parts = esmm_losses(out["ctr_logit"], out["cvr_logit"], batch["click"], batch["conversion"])
    from_ctr = _grads(model, parts["ctr"])
    from_ctcvr = _grads(model, parts["ctcvr"])
    from_total = _grads(model, model.loss(out, batch["click"], batch["conversion"]))
    cvr = [n for n in from_total if n.startswith("cvr_tower.")]
    assert cvr
    for name in cvr:
        assert torch.count_nonzero(from_ctr[name]) == 0  # the CTR loss never reaches it
        assert torch.allclose(from_total[name], from_ctcvr[name], atol=1e-7)
    assert any(torch.count_nonzero(from_ctcvr[n]) for n in cvr)
    table = "backbone.embeddings.tables.ad_id.weight"
    assert torch.count_nonzero(from_ctr[table]) > 0
    assert torch.count_nonzero(from_ctcvr[table]) > 0


def test_clicked_cvr_term_reads_clicked_rows_only_on_the_ctcvr_scale():
    cvr_logit = torch.tensor([0.3, -1.0, 2.0, -0.5, 1.5])
    click = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    conv = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    clicked = click > 0
    expected = F.binary_cross_entropy_with_logits(cvr_logit[clicked], conv[clicked]) * 3 / 5
    assert torch.allclose(clicked_cvr_loss(cvr_logit, click, conv), expected)
    flipped = torch.where(clicked, conv, 1.0 - conv)  # unclicked labels carry nothing
    assert torch.allclose(clicked_cvr_loss(cvr_logit, click, flipped), expected)
    assert clicked_cvr_loss(cvr_logit, torch.zeros(5), conv).item() == 0.0

    weighted = _model(replace(DENSE, cvr_click_weight=2.0)).train()
    batch = random_batch(tiny_schema(), size=32, seed=3)
    out = weighted(batch)
    parts = esmm_losses(out["ctr_logit"], out["cvr_logit"], batch["click"], batch["conversion"])
    direct = clicked_cvr_loss(out["cvr_logit"], batch["click"], batch["conversion"])
    assert batch["click"].sum() > 0 and direct.item() > 0
    total = weighted.loss(out, batch["click"], batch["conversion"])
    assert torch.allclose(total, parts["ctr"] + parts["ctcvr"] + 2.0 * direct)


def test_each_feature_is_embedded_once_per_forward():
    model = _model()
    calls: dict[str, int] = {}
    for name, table in model.backbone.embeddings.tables.items():
        table.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
    model(random_batch(tiny_schema()))
    # ad_id and category_id each feed one ad feature and one behaviour field; the other
    # tables one feature each. Running the embeddings per tower would double every count.
    assert calls == {"age_bucket": 1, "gender": 1, "ad_id": 2, "category_id": 2,
                     "price_bucket": 1, "scene": 1, "position": 1}


def test_score_candidates_equals_forward_on_the_expanded_batch():
    for softmax, match, offsets in ((False, False, False), (True, False, False),
                                    (False, True, False), (False, True, True)):
        config = RankerConfig(attention_hidden=(8, 4), tower_hidden=(16, 8),
                              attention_softmax=softmax, sparse_embeddings=False,
                              interest_match=match)
        model = _model(config)
        schema = tiny_schema()
        if offsets:  # per-ad offsets (AdOffsets) read the candidates' ad ids on both paths
            torch.manual_seed(1)
            for head in ("ctr", "cvr"):
                model.set_ad_offsets(head, torch.randn(schema["ad_id"].rows) * 0.5)
        cands = random_batch(schema, size=30, seed=7)
        user_row = random_batch(schema, size=1, length=8, seed=8, min_len=3)
        user = {n: user_row[n] for n in ("age_bucket", "gender", "hist_ad_id",
                                         "hist_category_id")}
        candidates = {n: cands[n] for n in ("ad_id", "category_id", "price_bucket", "position")}
        candidates["scene"] = user_row["scene"]  # request-level context, broadcast to all
        expanded = {k: v.expand(30, *v.shape[1:]) for k, v in user.items()}
        expanded.update({k: v.expand(30) for k, v in candidates.items()})
        with torch.inference_mode():
            fast = model.score_candidates(user, candidates)
            slow = model(expanded)
        for got, key in zip(fast, ("pctr", "pcvr", "pctcvr"), strict=True):
            assert torch.allclose(got, slow[key], atol=1e-5, rtol=1e-4)


def test_mba_l2_through_the_model_spares_absent_ids():
    model = _model().train()
    batch = random_batch(tiny_schema(), size=4)
    model.mba_l2(batch, 1e-2).backward()
    grad = model.backbone.embeddings.tables["ad_id"].weight.grad
    present = torch.unique(torch.cat([batch["ad_id"], batch["hist_ad_id"].reshape(-1)]))
    keep = torch.ones(grad.shape[0], dtype=torch.bool)
    keep[present] = False
    assert torch.count_nonzero(grad[keep]) == 0
    assert torch.count_nonzero(grad[present[present > 0]]) > 0


def test_interest_match_pools_the_cosines_of_real_behaviours_by_sharpness():
    from models.nn.backbone import InterestMatch

    query = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])  # cosines 0, 0.707, 1 (a pad)
    mask = torch.tensor([[True, True, False]])
    sharp, flat = InterestMatch(1, sharpness=1e4), InterestMatch(1, sharpness=1e-6)
    with torch.no_grad():
        assert torch.allclose(sharp([(query, keys)], mask), torch.tensor([[2 ** -0.5]]))
        assert torch.allclose(flat([(query, keys)], mask), torch.tensor([[2 ** -0.5 / 2]]))
        serving = sharp.for_candidates([(query, keys[0][mask[0]])])
    assert torch.allclose(serving, torch.tensor([[2 ** -0.5]]))
