"""Post-fit calibration: the affine fit recovers a known miscalibration, folding it into the
tower changes the logit exactly by it, and the order of the scores never changes."""

from __future__ import annotations

import numpy as np
import torch

from models.nn.layers import MLP
from models.train.calibrate import fit_affine, fold_into_output, logits_of


def test_the_fit_recovers_a_known_scale_and_shift_and_keeps_the_order() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(-3.0, 1.2, 400_000)  # what a model says: too confident and too high
    labels = rng.random(z.size) < 1 / (1 + np.exp(-(0.7 * z - 0.4)))  # what happens
    a, b = fit_affine(z, labels)
    assert abs(a - 0.7) < 0.03 and abs(b + 0.4) < 0.1
    calibrated = 1 / (1 + np.exp(-(a * z + b)))
    assert abs(calibrated.mean() / labels.mean() - 1) < 0.01
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(z, kind="stable"))
    _, shift = fit_affine(z, labels, scale=False)
    shifted = 1 / (1 + np.exp(-(z + shift)))
    assert abs(shifted.mean() / labels.mean() - 1) < 0.01  # the shift alone fixes the level


def test_too_few_positives_leave_the_head_alone() -> None:
    z = np.linspace(-4, 0, 10_000)
    labels = np.zeros(z.size, bool)
    labels[:10] = True
    assert fit_affine(z, labels) == (1.0, 0.0)


def test_folding_maps_the_logit_exactly() -> None:
    torch.manual_seed(0)
    tower = MLP(6, (8,), "relu", out_dim=1)
    x = torch.randn(32, 6)
    with torch.no_grad():
        before = tower(x)
        fold_into_output(tower, 0.8, -0.25)
        assert torch.allclose(tower(x), 0.8 * before - 0.25, atol=1e-6)
    assert np.allclose(logits_of(np.array([0.5, 0.25])), [0.0, np.log(1 / 3)])
