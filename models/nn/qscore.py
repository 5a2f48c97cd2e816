"""Qscore: ad-level smoothed CTR, (clicks + α) / (impressions + α + β), with a fitted Beta prior.

Why a fitted prior: raw clicks / impressions gives a new ad 0/0 and an ad with 3 impressions
and 1 click a CTR of 33%. The Beta(α, β) prior is fitted to the whole catalog by empirical
Bayes (method of moments, refined by Minka's fixed-point MLE of the beta-binomial), so a new ad
scores the catalog's prior mean and a young ad is shrunk toward it in proportion to how little
it has been shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_MIN_PARAM = 1e-3
# When ads show no detectable spread the MLE strength runs to infinity; cap it so the prior
# never outweighs an average ad's own evidence (or 1000 impressions, whichever is larger).
_MIN_CAP = 1000.0


@dataclass(frozen=True)
class Qscore:
    """A fitted Beta(alpha, beta) prior over ad CTRs."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"qscore.{name}: must be a positive finite number, got {value}")

    @property
    def prior_mean(self) -> float:
        """The CTR an ad with no impressions gets."""
        return self.alpha / (self.alpha + self.beta)

    @classmethod
    def fit(cls, impressions: Any, clicks: Any, iterations: int = 100) -> Qscore:
        """Fit the prior from per-ad counts (ads with no impressions carry no information)."""
        n = np.asarray(impressions, dtype=np.float64).reshape(-1)
        c = np.asarray(clicks, dtype=np.float64).reshape(-1)
        if n.shape != c.shape:
            raise ValueError(f"qscore.fit: {n.shape[0]} impression counts vs {c.shape[0]} clicks")
        if np.any(n < 0) or np.any(c < 0) or np.any(c > n):
            raise ValueError("qscore.fit: counts must satisfy 0 <= clicks <= impressions")
        keep = n > 0
        n, c = n[keep], c[keep]
        if n.size == 0:
            return cls(1.0, 99.0)  # no evidence at all: a weak 1% prior
        cap = max(_MIN_CAP, float(n.mean()))
        alpha, beta = _moments(n, c, cap)
        if n.size >= 2 and c.sum() > 0:
            alpha, beta = _fixed_point(n, c, alpha, beta, iterations, cap)
        return cls(float(alpha), float(beta))

    def score(self, impressions: Any, clicks: Any) -> np.ndarray:
        """Posterior mean CTR per ad (float64); works on scalars and arrays alike."""
        n = np.asarray(impressions, dtype=np.float64)
        c = np.asarray(clicks, dtype=np.float64)
        return (c + self.alpha) / (n + self.alpha + self.beta)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "beta_prior_ctr", "alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Qscore:
        if not isinstance(data, dict) or data.get("kind") != "beta_prior_ctr":
            raise ValueError("qscore: expected {'kind': 'beta_prior_ctr', 'alpha', 'beta'}")
        try:
            return cls(float(data["alpha"]), float(data["beta"]))
        except KeyError as exc:
            raise ValueError(f"qscore: missing key {exc.args[0]!r}") from None


def _moments(n: np.ndarray, c: np.ndarray, cap: float) -> tuple[float, float]:
    """Method of moments: between-ad variance = observed variance − binomial noise."""
    mean = (c.sum() + 0.5) / (n.sum() + 1.0)  # pooled CTR, never exactly 0 or 1
    rates = c / n
    noise = np.mean(mean * (1.0 - mean) / n)
    between = np.var(rates) - noise
    if between <= 0:
        strength = cap  # no detectable spread: all ads look alike
    else:
        strength = float(np.clip(mean * (1.0 - mean) / between - 1.0, 2 * _MIN_PARAM, cap))
    return max(mean * strength, _MIN_PARAM), max((1.0 - mean) * strength, _MIN_PARAM)


def _fixed_point(
    n: np.ndarray, c: np.ndarray, alpha: float, beta: float, iterations: int, cap: float
) -> tuple[float, float]:
    """Minka's fixed-point iteration for the beta-binomial maximum-likelihood prior."""
    dg = torch.special.digamma
    nt, ct = torch.from_numpy(n), torch.from_numpy(c)
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    for _ in range(iterations):
        denom = (dg(nt + a + b) - dg(a + b)).sum()
        if denom <= 0:
            break
        new_a = a * (dg(ct + a) - dg(a)).sum() / denom
        new_b = b * (dg(nt - ct + b) - dg(b)).sum() / denom
        new_a, new_b = new_a.clamp(min=_MIN_PARAM), new_b.clamp(min=_MIN_PARAM)
        if new_a + new_b > cap:  # keep the mean, cap the strength
            new_a, new_b = new_a * cap / (new_a + new_b), new_b * cap / (new_a + new_b)
        done = abs(new_a - a) < 1e-6 * a and abs(new_b - b) < 1e-6 * b
        a, b = new_a, new_b
        if done:
            break
    return float(a), float(b)
