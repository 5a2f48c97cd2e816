"""Rocket training: the DQM trained beside DIN+ESMM keeps more of the ranker's top K.

Known-signal data: a candidate is clicked with a probability that rises sharply when its
category is among the user's recent behaviours (so DIN's attention can learn it) on top of a
low base rate, and labels are noisy Bernoulli draws. Both DQMs see the same batches and steps;
the only difference is the booster and the hint loss.
"""

from __future__ import annotations

import torch

from models.nn.config import DqmConfig, RankerConfig
from models.nn.din_esmm import DinEsmm
from models.nn.dqm import Dqm
from models.nn.layers import build_optimizers
from models.train.rocket import RocketConfig, RocketPair
from tests.test_nn_support import category_of, random_batch, tiny_schema

SCHEMA = tiny_schema()
RANKER = RankerConfig(sparse_embeddings=True)
DQM = DqmConfig(sparse_embeddings=True)


def _truth(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    seen = (batch["hist_category_id"] == batch["category_id"].unsqueeze(1)).any(1)
    return 0.02 + 0.4 * seen.float() + 0.03 * (batch["price_bucket"] < 3).float()


def _batch(size: int, seed: int) -> dict[str, torch.Tensor]:
    batch = random_batch(SCHEMA, size=size, length=8, seed=seed, min_len=1)
    gen = torch.Generator().manual_seed(10_000 + seed)
    # a third of the candidates come from a category the user has seen
    pick = torch.randint(0, 8, (size,), generator=gen) % (batch["hist_ad_id"] != 0).sum(1)
    seen_ad = batch["hist_ad_id"].gather(1, pick.unsqueeze(1)).squeeze(1)
    use_seen = torch.rand(size, generator=gen) < 0.33
    batch["ad_id"] = torch.where(use_seen, seen_ad, batch["ad_id"])
    batch["category_id"] = category_of(batch["ad_id"])
    batch["click"] = (torch.rand(size, generator=gen) < _truth(batch)).float()
    batch["conversion"] = batch["click"] * (torch.rand(size, generator=gen) < 0.2).float()
    return batch


def _train(model: torch.nn.Module, steps: int) -> None:
    torch.manual_seed(0)
    optimizers = build_optimizers(model, lr=1e-2)
    model.train()
    for step in range(steps):
        batch = _batch(128, seed=step)
        loss = model.training_loss(batch) + model.mba_l2(batch, 1e-6)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    model.eval()


def _requests(n: int, candidates: int) -> list[dict[str, torch.Tensor]]:
    """One user (its history and profile repeated) against `candidates` ads, per request."""
    out = []
    for i in range(n):
        batch = _batch(candidates, seed=50_000 + i)
        for name in ("hist_ad_id", "hist_category_id", "age_bucket", "gender", "scene",
                     "position"):
            batch[name] = batch[name][:1].expand_as(batch[name]).contiguous()
        batch["category_id"] = category_of(batch["ad_id"])
        out.append(batch)
    return out


def _kept(light: Dqm, booster: DinEsmm, requests: list[dict[str, torch.Tensor]], k: int,
          keep: int) -> float:
    """Share of the booster's top k that is inside the light net's top `keep`."""
    shares = []
    with torch.no_grad():
        for batch in requests:
            best = set(torch.topk(booster(batch)["ctr_logit"], k).indices.tolist())
            pre = set(torch.topk(light(batch), keep).indices.tolist())
            shares.append(len(best & pre) / k)
    return sum(shares) / len(shares)


def test_rocket_pair_shares_tables_and_stops_the_hint_gradient_at_the_booster() -> None:
    torch.manual_seed(0)
    pair = RocketPair(DinEsmm(SCHEMA, RANKER), Dqm(SCHEMA, DQM))
    assert pair.light.embeddings is pair.booster.backbone.embeddings
    batch = _batch(64, seed=1)
    pair.losses(batch)["hint"].backward()
    booster_grads = [p.grad for n, p in pair.booster.named_parameters()
                     if "embeddings" not in n and p.grad is not None]
    assert booster_grads == []  # the hint moves the light net (and the shared tables) only
    assert any(p.grad is not None for p in pair.light.user_tower.parameters())


def test_rocket_dqm_keeps_more_of_the_boosters_top_k_than_the_plain_dqm() -> None:
    steps = 50
    torch.manual_seed(0)
    pair = RocketPair(DinEsmm(SCHEMA, RANKER), Dqm(SCHEMA, DQM), RocketConfig(hint_weight=1.0))
    _train(pair, steps)
    torch.manual_seed(0)
    plain = Dqm(SCHEMA, DQM)
    _train(plain, steps)
    requests = _requests(20, 150)
    rocket_kept = _kept(pair.light, pair.booster, requests, k=10, keep=30)
    plain_kept = _kept(plain, pair.booster, requests, k=10, keep=30)
    assert rocket_kept > plain_kept + 0.03, (rocket_kept, plain_kept)


def test_two_tower_distillation_learns_the_rankers_order_over_sampled_candidates() -> None:
    """The teacher prefers one category among each row's sampled candidates; after a few
    distillation steps the tower ranks that category's candidates above the others."""
    from models.nn.config import TwoTowerConfig
    from models.nn.two_tower import CANDIDATE, TwoTower

    torch.manual_seed(0)
    tower = TwoTower(SCHEMA, TwoTowerConfig(hidden=(16,), out_dim=8, distill_candidates=8))
    optimizers = build_optimizers(tower, lr=1e-2)

    def batch(seed: int) -> dict[str, torch.Tensor]:
        rows = random_batch(SCHEMA, size=64, length=8, seed=seed, min_len=1)
        gen = torch.Generator().manual_seed(seed)
        cand_ad = torch.randint(1, SCHEMA["ad_id"].rows, (64, 8), generator=gen)
        rows[CANDIDATE + "ad_id"] = cand_ad
        rows[CANDIDATE + "category_id"] = category_of(cand_ad)
        rows[CANDIDATE + "price_bucket"] = torch.randint(1, 10, (64, 8), generator=gen)
        rows["teacher"] = 3.0 * (rows[CANDIDATE + "category_id"] == 5).float()
        return rows

    def preferred_margin(rows: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            user = tower.user_vector(rows)
            names = SCHEMA.names("ad")
            ads = tower.ad_vector({n: rows[CANDIDATE + n].reshape(-1) for n in names})
            scores = torch.einsum("bd,bsd->bs", user, ads.reshape(64, 8, -1))
        liked = rows[CANDIDATE + "category_id"] == 5
        return float(scores[liked].mean() - scores[~liked].mean())

    held_out = batch(999)
    before = preferred_margin(held_out)
    first = float(tower.distill_loss(held_out))
    tower.train()
    for step in range(60):
        rows = batch(step)
        loss = tower.training_loss(rows)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    tower.eval()
    assert float(tower.distill_loss(held_out)) < first
    # cosine units: x 1/temperature (20) in logits
    assert preferred_margin(held_out) > before + 0.03
