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
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

MIN_POSITIVES = 50  # fewer validation positives than this: leave the head as trained
_EPS = 1e-7


def logits_of(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_affine(logits: np.ndarray, labels: np.ndarray, *, scale: bool = True,
               iterations: int = 50) -> tuple[float, float]:
    """(a, b) maximising the Bernoulli likelihood of `labels` under sigmoid(a * z + b).

    Newton's method on one or two parameters (the log-likelihood is concave); returns (1, 0)
    when there are too few positives or negatives to say anything."""
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)
    positives = float(y.sum())
    if positives < MIN_POSITIVES or len(y) - positives < MIN_POSITIVES:
        return 1.0, 0.0
    a, b = 1.0, 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        w = p * (1 - p)
        r = y - p
        if scale:
            grad = np.array([(r * z).sum(), r.sum()])
            hess = np.array([[(w * z * z).sum(), (w * z).sum()], [(w * z).sum(), w.sum()]])
            step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
            a, b = a + step[0], b + step[1]
        else:
            step_b = r.sum() / max(w.sum(), 1e-12)
            b += step_b
            step = np.array([0.0, step_b])
        if np.abs(step).max() < 1e-9:
            break
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return 1.0, 0.0  # an order-reversing or broken fit is no calibration
    return float(a), float(b)


def fold_into_output(tower: nn.Module, a: float, b: float) -> None:
    """Make the tower output `a * logit + b` by rescaling its last linear layer."""
    last = tower.net[-1]
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise ValueError("calibration needs a tower ending in a biased linear layer")
    with torch.no_grad():
        last.weight.mul_(a)
        last.bias.mul_(a).add_(b)
