"""DIN+ESMM's per-ad offsets: the ads' counted log-odds, weighted by a fit on validation rows.

Guards: an offset moves only its own ad's logits; the counts are Qscore's posterior; the blend
finds the weight a known prior carries, and none for a useless or reversed one. Elsewhere:
the serving path's equality with forward, offsets included (test_nn_din_esmm), and the
published ranker's offsets at their fitted weight (test_train_eval).
"""

from __future__ import annotations

import numpy as np
import torch

from models.nn.config import RankerConfig
from models.nn.din_esmm import DinEsmm
from models.nn.qscore import Qscore
from models.train.calibrate import count_offsets, fit_affine, fit_blend, logits_of
from tests.test_nn_support import random_batch, tiny_schema

CONFIG = RankerConfig(attention_hidden=(8, 4), tower_hidden=(16, 8), sparse_embeddings=False)


def _model() -> DinEsmm:
    """An eval-mode model with trained-looking Dice statistics and non-zero offsets."""
    torch.manual_seed(0)
    model = DinEsmm(tiny_schema(), CONFIG)
    with torch.no_grad():
        for step in range(3):
            model.train()(random_batch(tiny_schema(), size=32, seed=50 + step))
    rows = tiny_schema()["ad_id"].rows
    model.set_ad_offsets("ctr", torch.randn(rows) * 0.5)
    model.set_ad_offsets("cvr", torch.randn(rows) * 0.5)
    return model.eval()


def test_an_ads_offset_moves_its_own_logits_and_no_others() -> None:
    model = _model()
    batch = random_batch(tiny_schema(), size=16, seed=3)
    row = int(batch["ad_id"][0])
    with torch.inference_mode():
        before = model(batch)
    ctr = model.ad_offsets.offsets[:, 0].clone()
    ctr[row] += 1.0
    model.set_ad_offsets("ctr", ctr)
    with torch.inference_mode():
        after = model(batch)
    moved = (batch["ad_id"] == row).float()
    assert torch.allclose(after["ctr_logit"] - before["ctr_logit"], moved, atol=1e-5)
    assert torch.equal(after["cvr_logit"], before["cvr_logit"])
    assert float(model.ad_offsets.offsets[0].abs().sum()) == 0.0  # the pad row stays 0


def test_offsets_are_saved_with_the_weights_and_old_bundles_have_none() -> None:
    model = _model()
    assert "ad_offsets.offsets" in model.state_dict()
    old = CONFIG.to_dict()
    del old["ad_offsets"]  # a manifest written before the offsets existed
    assert DinEsmm(tiny_schema(), RankerConfig.from_dict(old)).ad_offsets is None


def test_count_offsets_are_the_posterior_log_odds_and_zero_without_evidence() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(1, 40, 5000)  # rows 40.. never seen
    click = (rng.random(5000) < np.where(rows < 10, 0.3, 0.1)).astype(np.float32)
    conversion = click * (rng.random(5000) < 0.2)
    ctr, cvr = count_offsets(rows, click, conversion, 50)
    impressions = np.bincount(rows, minlength=50)
    clicks = np.bincount(rows, weights=click, minlength=50)
    prior = Qscore.fit(impressions, clicks)
    want = logits_of(prior.score(impressions, clicks)) - logits_of(np.array(prior.prior_mean))
    assert np.allclose(ctr.numpy(), want)
    assert np.allclose(ctr.numpy()[40:], 0.0) and np.allclose(cvr.numpy()[40:], 0.0)
    assert ctr.numpy()[1:10].min() > ctr.numpy()[10:40].max()  # the better ads stand out


def _labels(logit: np.ndarray, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(logit.shape) < 1 / (1 + np.exp(-logit)))


def test_the_blend_recovers_a_known_weight_and_ignores_noise() -> None:
    rng = np.random.default_rng(1)
    z, prior, noise = rng.normal(size=(3, 40_000))
    labels = _labels(0.8 * z - 2.0 + 0.6 * prior, seed=2)
    a, b, c = fit_blend(z, labels, prior)
    assert abs(a - 0.8) < 0.05 and abs(b + 2.0) < 0.05 and abs(c - 0.6) < 0.05
    a, b, c = fit_blend(z, labels, -prior)  # a prior read backwards carries no weight
    assert c == 0.0 and (a, b) == fit_affine(z, labels)
    _, _, c = fit_blend(z, _labels(0.8 * z - 2.0, seed=3), noise)
    assert c < 0.05


def test_the_blend_without_a_scale_keeps_the_logits_slope() -> None:
    rng = np.random.default_rng(4)
    z, prior = rng.normal(size=(2, 40_000))
    a, b, c = fit_blend(z, _labels(z + 0.5 + 0.3 * prior, seed=5), prior, scale=False)
    assert a == 1.0 and abs(b - 0.5) < 0.05 and abs(c - 0.3) < 0.05
