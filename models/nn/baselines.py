"""Baselines with the ranker's embeddings and sizes, so comparisons isolate one idea each.

- `BaseModel` (`base`): sum-pooled history + MLP, CTR only. DIN beating it measures target
  attention.
- `CvrBase` (`cvr_base`): the ESMM paper's BASE, the same network as ESMM's CVR branch (DIN
  backbone + CVR tower) trained on clicked impressions only. ESMM beating it on CVR fidelity
  over all impressions measures sample-selection bias, not an architecture difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.features.schema import FeatureSchema
from models.nn.backbone import DinBackbone, SumPoolBackbone
from models.nn.config import RankerConfig
from models.nn.layers import MLP, Batch, log_odds


class BaseModel(nn.Module):
    """Embeddings + sum-pooled behaviour + Dice MLP → CTR logit."""

    def __init__(self, schema: FeatureSchema, config: RankerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RankerConfig()
        cfg = self.config
        self.backbone = SumPoolBackbone(schema, cfg)
        self.ctr_tower = MLP(
            self.backbone.out_dim, cfg.tower_hidden, cfg.tower_activation, cfg.dropout, 1
        )

    def init_base_rates(self, ctr: float, cvr: float) -> None:
        self.ctr_tower.init_output_bias(log_odds(ctr))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctr_logit = self.ctr_tower(self.backbone(batch)).squeeze(-1)
        return {"ctr_logit": ctr_logit, "pctr": torch.sigmoid(ctr_logit)}

    def loss(
        self,
        out: dict[str, torch.Tensor],
        click: torch.Tensor,
        conversion: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BCE(pCTR, click) over all impressions (`conversion` is ignored)."""
        return F.binary_cross_entropy_with_logits(
            out["ctr_logit"], click.to(out["ctr_logit"].dtype)
        )

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.loss(self(batch), batch["click"])

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        return self.backbone.embeddings.mba_l2(batch, lam)

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"pctr": self(batch)["pctr"]}


class CvrBase(nn.Module):
    """DIN backbone + CVR tower, trained on clicked impressions only (ESMM's BASE)."""

    def __init__(self, schema: FeatureSchema, config: RankerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RankerConfig()
        cfg = self.config
        self.backbone = DinBackbone(schema, cfg)
        self.cvr_tower = MLP(
            self.backbone.out_dim, cfg.tower_hidden, cfg.tower_activation, cfg.dropout, 1
        )

    def init_base_rates(self, ctr: float, cvr: float) -> None:
        self.cvr_tower.init_output_bias(log_odds(cvr))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cvr_logit = self.cvr_tower(self.backbone(batch)).squeeze(-1)
        return {"cvr_logit": cvr_logit, "pcvr": torch.sigmoid(cvr_logit)}

    def loss(
        self, out: dict[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> torch.Tensor:
        """BCE(pCVR, conversion) averaged over clicked rows; unclicked rows contribute nothing.

        Masking here (rather than relying on the trainer to filter) keeps the BASE definition
        in one place; a batch without clicks gives an exact zero that still backpropagates.
        """
        logit = out["cvr_logit"]
        clicked = click.to(logit.dtype)
        per_row = F.binary_cross_entropy_with_logits(
            logit, conversion.to(logit.dtype), reduction="none"
        )
        return (per_row * clicked).sum() / clicked.sum().clamp(min=1.0)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.loss(self(batch), batch["click"], batch["conversion"])

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        return self.backbone.embeddings.mba_l2(batch, lam)

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"pcvr": self(batch)["pcvr"]}
