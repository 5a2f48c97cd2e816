"""Post-fit calibration of a ranker's heads on validation rows, folded into the output layer.

Why: the auction multiplies pCTR (and pCVR) by money, so a ranker that over-predicts clicks by
10% over-charges nobody but mis-ranks CPC against oCPA ads and misreports expected revenue.
Training picks the point with the best validation AUC, which says nothing about the level of
the probabilities; an id-heavy network trained on earlier rows also drifts upwards on later
ones (its memorised ids looked better in training than they are). One affine map of the logit,
`a * z + b`, fitted by maximum likelihood on the validation rows (later in time than the
training rows and never the test rows), fixes the level without touching the order (a > 0).
It is folded into the tower's last linear layer, so serving, bundles and every reader of the
model stay as they are.

CVR has a few hundred validation conversions, so only its shift is fitted.

The same fit also weighs a prior the network never read as an input: each ad's counted
log-odds (`fit_blend`), which DIN+ESMM then serves as fixed per-ad offsets (`AdOffsets`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.nn.qscore import Qscore

MIN_POSITIVES = 50  # fewer validation positives than this: leave the head as trained
_EPS = 1e-7


def logits_of(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_affine(logits: np.ndarray, labels: np.ndarray, *, scale: bool = True,
               iterations: int = 50) -> tuple[float, float]:
    """(a, b) maximising the Bernoulli likelihood of `labels` under sigmoid(a * z + b).

    Returns (1, 0) when there are too few positives or negatives to say anything."""
    a, b, _ = fit_blend(logits, labels, None, scale=scale, iterations=iterations)
    return a, b


def fit_blend(logits: np.ndarray, labels: np.ndarray, offsets: np.ndarray | None, *,
              scale: bool = True, iterations: int = 50) -> tuple[float, float, float]:
    """(a, b, c) maximising the likelihood of `labels` under sigmoid(a * z + b + c * o).

    `o` is a per-row prior log-odds the network did not see as an input (each ad's counted
    CTR, `AdOffsets`); c says how much of it to add, and is kept >= 0 (a prior read
    backwards is no evidence: the fit is redone without it). Without `scale`, a stays 1.
    Newton's method (the log-likelihood is concave); (1, 0, 0) when there are too few
    positives or negatives, or the fit breaks or reverses the order (a <= 0)."""
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)
    positives = float(y.sum())
    if positives < MIN_POSITIVES or len(y) - positives < MIN_POSITIVES:
        return 1.0, 0.0, 0.0
    columns = ([z] if scale else []) + ([offsets.astype(np.float64)] if offsets is not None
                                        else []) + [np.ones_like(z)]
    x = np.stack(columns, axis=1)
    theta = np.zeros(x.shape[1])
    if scale:
        theta[0] = 1.0
    fixed = np.zeros_like(z) if scale else z
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(fixed + x @ theta)))
        hess = (x * (p * (1 - p))[:, None]).T @ x
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(theta)), x.T @ (y - p))
        theta += step
        if np.abs(step).max() < 1e-9:
            break
    a = float(theta[0]) if scale else 1.0
    c = float(theta[-2]) if offsets is not None else 0.0
    b = float(theta[-1])
    if not all(math.isfinite(v) for v in (a, b, c)) or a <= 0:
        return 1.0, 0.0, 0.0  # an order-reversing or broken fit is no calibration
    if c < 0:
        return (*fit_affine(logits, labels, scale=scale, iterations=iterations), 0.0)
    return a, b, c


def fold_into_output(tower: nn.Module, a: float, b: float) -> None:
    """Make the tower output `a * logit + b` by rescaling its last linear layer."""
    last = tower.net[-1]
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise ValueError("calibration needs a tower ending in a biased linear layer")
    with torch.no_grad():
        last.weight.mul_(a)
        last.bias.mul_(a).add_(b)


def count_offsets(rows: np.ndarray, click: np.ndarray, conversion: np.ndarray, size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior `fit_blend` weighs: per table row (of `size`), the log-odds of its smoothed
    CTR and CVR minus the prior's. Qscore's empirical-Bayes posterior over impressions ->
    clicks and clicks -> conversions, so a row with no evidence gets 0 and a well-observed ad
    about its own rate."""
    impressions = np.bincount(rows, minlength=size)
    clicks = np.bincount(rows, weights=click, minlength=size)
    conversions = np.bincount(rows, weights=click * conversion, minlength=size)
    out = []
    for trials, hits in ((impressions, clicks), (clicks, conversions)):
        prior = Qscore.fit(trials, hits)
        rate = prior.score(trials, hits)
        out.append(torch.from_numpy(logits_of(rate) - logits_of(np.array(prior.prior_mean))))
    return out[0], out[1]
