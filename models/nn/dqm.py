"""DQM pre-ranker (Deep Quality Model): user, scene and ad towers scored by inner products only.

score = ⟨u, a⟩ + ⟨s, a⟩ + bias(a) = ⟨u + s, a⟩ once the per-ad bias is folded into the ad
vector as an extra dimension (the user side carries a constant 1 there, the scene side a 0).
So ad vectors precompute into a matrix, and serving is two small tower passes plus one
gather and one matrix product: `(user_vector + scene_vector) @ ad_matrix[candidates].T`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.features.schema import FeatureSchema
from models.nn.config import DqmConfig
from models.nn.layers import MLP, Batch, EmbeddingCollection, log_odds, masked_mean


class Dqm(nn.Module):
    """Three towers → vectors of width `out_dim` (+1 with `ad_bias`); logit = ⟨u + s, a⟩."""

    def __init__(self, schema: FeatureSchema, config: DqmConfig | None = None) -> None:
        super().__init__()
        self.config = config or DqmConfig()
        cfg = self.config
        self.embeddings = EmbeddingCollection(schema, sparse=cfg.sparse_embeddings,
                                              init_std=cfg.init_std)
        user_in = self.embeddings.group_dim("user") + self.embeddings.group_dim("behaviour")
        extra = 1 if cfg.ad_bias else 0
        self.user_tower = MLP(user_in, cfg.hidden, "relu", 0.0, cfg.out_dim)
        self.scene_tower = MLP(self.embeddings.group_dim("scene"), cfg.hidden, "relu", 0.0,
                               cfg.out_dim)
        self.ad_tower = MLP(self.embeddings.group_dim("ad"), cfg.hidden, "relu", 0.0,
                            cfg.out_dim + extra)
        # A global intercept folded into every ad's bias dimension (CTRs are far from 0.5).
        self.global_bias = nn.Parameter(torch.zeros(1)) if cfg.ad_bias else None

    def init_base_rates(self, ctr: float, cvr: float) -> None:
        """Start the global intercept at the data's CTR log-odds."""
        if self.global_bias is not None:
            with torch.no_grad():
                self.global_bias.fill_(log_odds(ctr))

    @property
    def vector_dim(self) -> int:
        """Width of exported vectors (out_dim, plus the bias dimension)."""
        return self.config.out_dim + (1 if self.config.ad_bias else 0)

    def _pad(self, vec: torch.Tensor, value: float) -> torch.Tensor:
        if not self.config.ad_bias:
            return vec
        return F.pad(vec, (0, 1), value=value)

    def user_vector(self, batch: Batch) -> torch.Tensor:
        """[B, vector_dim] from user and behaviour features (bias slot = 1)."""
        behaviour = self.embeddings(batch, "behaviour")
        pooled = masked_mean(behaviour, self.embeddings.sequence_mask(batch))
        x = torch.cat([self.embeddings(batch, "user"), pooled], dim=-1)
        return self._pad(self.user_tower(x), 1.0)

    def scene_vector(self, batch: Batch) -> torch.Tensor:
        """[B, vector_dim] from scene features (bias slot = 0, so the bias counts once)."""
        return self._pad(self.scene_tower(self.embeddings(batch, "scene")), 0.0)

    def ad_vector(self, batch: Batch) -> torch.Tensor:
        """[N, vector_dim] from ad features only; the last slot holds the ad's bias."""
        vec = self.ad_tower(self.embeddings(batch, "ad"))
        if self.global_bias is None:
            return vec
        bias = vec[:, -1:] + self.global_bias
        return torch.cat([vec[:, :-1], bias], dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Click logit per row, [B]."""
        query = self.user_vector(batch) + self.scene_vector(batch)
        return (query * self.ad_vector(batch)).sum(-1)

    @staticmethod
    def score(query: torch.Tensor, ad_matrix: torch.Tensor) -> torch.Tensor:
        """Serving: logits [N] for query = user_vector + scene_vector ([1, d] or [d])."""
        return ad_matrix @ query.reshape(-1)

    def loss(self, logit: torch.Tensor, click: torch.Tensor) -> torch.Tensor:
        """BCE on clicks over all impressions."""
        return F.binary_cross_entropy_with_logits(logit, click.to(logit.dtype))

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.loss(self(batch), batch["click"])

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        return self.embeddings.mba_l2(batch, lam)

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"pctr": torch.sigmoid(self(batch))}
