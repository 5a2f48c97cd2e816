"""A tiny synthetic problem where the history decides the click: DIN must learn it.

The candidate is clicked exactly when its category appears in the user's history, so a model
that cannot relate the candidate to the behaviours stays at AUC 0.5. Trained the way the
trainer should train (sparse tables on SparseAdam, dense weights on Adam, MBA L2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.nn.baselines import BaseModel
from models.nn.config import RankerConfig
from models.nn.din_esmm import DinEsmm
from models.nn.layers import build_optimizers
from tests.test_nn_support import category_of, random_batch, tiny_schema


def _synthetic(size: int, seed: int) -> dict[str, torch.Tensor]:
    schema = tiny_schema()
    gen = torch.Generator().manual_seed(seed)
    batch = random_batch(schema, size=size, length=8, seed=seed, min_len=1)
    hist_cat = batch["hist_category_id"]
    # Half the candidates come from a category the user has seen.
    pick = torch.randint(0, 8, (size,), generator=gen) % (hist_cat != 0).sum(1)
    seen_cat = hist_cat.gather(1, pick.unsqueeze(1)).squeeze(1)
    seen_ad = (seen_cat - 1) + 20 * torch.randint(0, 9, (size,), generator=gen)
    seen_ad = torch.where(seen_ad == 0, torch.full_like(seen_ad, 180), seen_ad)
    use_seen = torch.rand(size, generator=gen) < 0.5
    batch["ad_id"] = torch.where(use_seen, seen_ad, batch["ad_id"])
    batch["category_id"] = category_of(batch["ad_id"])
    click = (hist_cat == batch["category_id"].unsqueeze(1)).any(1).float()
    batch["click"] = click
    batch["conversion"] = click * (batch["price_bucket"] <= 5).float()
    return batch


def _auc(score: torch.Tensor, label: torch.Tensor) -> float:
    order = torch.argsort(score)
    ranks = torch.empty_like(score).index_copy_(0, order, torch.arange(1, len(score) + 1.0))
    pos = label > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _train(model: torch.nn.Module, steps: int = 300,
           batches: Callable[..., dict[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    """`steps` Adam/Adagrad steps on `batches(128, seed=step)` (default: this file's task)."""
    batches = batches or _synthetic
    optimizers = build_optimizers(model, lr=1e-2)
    model.train()
    for step in range(steps):
        batch = batches(128, seed=step)
        loss = model.training_loss(batch) + model.mba_l2(batch, 1e-5)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    return model.eval()


def test_din_learns_a_click_that_only_the_history_explains_and_beats_sum_pooling():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended
    try:
        config = RankerConfig(attention_hidden=(16, 8), tower_hidden=(32, 16))
        torch.manual_seed(0)
        din = _train(DinEsmm(tiny_schema(), config))
        torch.manual_seed(0)
        base = _train(BaseModel(tiny_schema(), config))
    finally:
        torch.set_num_threads(threads)
    test = _synthetic(2000, seed=999)
    assert 0.3 < test["click"].mean() < 0.7
    with torch.inference_mode():
        out = din(test)
        base_auc = _auc(base(test)["pctr"], test["click"])
    ctr_auc = _auc(out["pctr"], test["click"])
    ctcvr_auc = _auc(out["pctcvr"], test["click"] * test["conversion"])
    assert ctr_auc > 0.9, ctr_auc
    assert ctr_auc > base_auc + 0.03, (ctr_auc, base_auc)
    assert ctcvr_auc > 0.85, ctcvr_auc
