"""Rocket training (Zhou et al., "Rocket Launching", AAAI 2018): DQM learns beside DIN+ESMM.

Why: the pre-ranker exists to keep what the ranker would pick, but trained alone on clicks it
only learns what the sparse labels reveal, and orders candidates its own way. Trained together,
the light net (DQM) reads the same embedding tables as the booster (DIN+ESMM) and is pulled
towards the booster's CTR logit by a hint loss on every impression, so it inherits the
booster's ordering. The hint's gradient is stopped on the booster side: the booster learns from
labels only, the light net follows it and never drags it towards what an inner product can
express.

Training-only: serving loads the two networks separately (`Dqm`, `DinEsmm`), each saved with its
own copy of the shared tables, so a bundle looks exactly like one trained without Rocket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.nn.din_esmm import DinEsmm
from models.nn.dqm import Dqm
from models.nn.layers import Batch


@dataclass(frozen=True)
class RocketConfig:
    """`hint_weight` scales the MSE between the DQM and booster CTR logits; `share_embeddings`
    makes the DQM read the booster's tables (the paper's shared lower layers)."""

    hint_weight: float = 1.0
    share_embeddings: bool = True


class RocketPair(nn.Module):
    """Booster + light net trained by one loss: booster ESMM loss + light BCE + hint.

    Example::

        pair = RocketPair(DinEsmm(schema), Dqm(schema))
        loss = pair.training_loss(batch) + pair.mba_l2(batch, 1e-5)
        dqm, din = pair.light, pair.booster   # saved and served separately
    """

    def __init__(self, booster: DinEsmm, light: Dqm, config: RocketConfig | None = None) -> None:
        super().__init__()
        self.config = config or RocketConfig()
        self.booster = booster
        self.light = light
        if self.config.share_embeddings:
            light.embeddings = booster.backbone.embeddings  # one set of tables, two readers

    def parts(self) -> tuple[nn.Module, nn.Module]:
        """The two networks that are saved and served separately."""
        return (self.booster, self.light)

    def init_base_rates(self, ctr: float, cvr: float) -> None:
        self.booster.init_base_rates(ctr, cvr)
        self.light.init_base_rates(ctr, cvr)

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The three terms, for logging and tests."""
        out = self.booster(batch)
        light_logit = self.light(batch)
        return {
            "booster": self.booster.loss(out, batch["click"], batch["conversion"]),
            "light": self.light.loss(light_logit, batch["click"]),
            "hint": F.mse_loss(light_logit, out["ctr_logit"].detach()),
        }

    def training_loss(self, batch: Batch) -> torch.Tensor:
        parts = self.losses(batch)
        return parts["booster"] + parts["light"] + self.config.hint_weight * parts["hint"]

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        """Each distinct table set regularised once."""
        total = self.booster.mba_l2(batch, lam)
        if not self.config.share_embeddings:
            total = total + self.light.mba_l2(batch, lam)
        return total

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The booster's outputs plus the light net's pCTR (`dqm_pctr`)."""
        return {**self.booster.predict(batch), "dqm_pctr": torch.sigmoid(self.light(batch))}
