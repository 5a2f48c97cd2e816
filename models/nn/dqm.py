"""DQM pre-ranker (Deep Quality Model): user, scene and ad towers scored by inner products only.

score = ⟨u, a⟩ + ⟨s, a⟩ + bias(a) = ⟨u + s, a⟩ once the per-ad bias is folded into the ad
vector as an extra dimension (the user side carries a constant 1 there, the scene side a 0).
So ad vectors precompute into a matrix, and serving is two small tower passes plus one
gather and one matrix product: `(user_vector + scene_vector) @ ad_matrix[candidates].T`.

With `interest_match` (the default) the logit also gets Σ_f w_f · match_f: the ranker's
`InterestMatch` feature per behaviour field (the candidate's cosine to the user's behaviours
in the shared table, pooled by a softmax with a learnt sharpness; 0 for an empty history),
each times a learnt scalar w_f. Why: the inner product sees the history only through the user
tower's MEAN of behaviour embeddings, so "this ad's category is one the user clicked" is
washed out exactly as in DIN before the match, and the pre-ranker drops ads the ranker would
pick. The term stays cheap to serve: the candidates' normalised rows precompute like the ad
vectors, and a request adds one [N, D] @ [D, L] per field (`services.prerank.preranker`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.features.schema import FeatureSchema
from models.nn.backbone import InterestMatch, query_names
from models.nn.config import DqmConfig
from models.nn.layers import MLP, Batch, EmbeddingCollection, log_odds, masked_mean

Embedded = dict[str, torch.Tensor]


class Dqm(nn.Module):
    """Three towers → vectors of width `out_dim` (+1 with `ad_bias`); logit = ⟨u + s, a⟩,
    plus Σ_f w_f · match_f with `interest_match`."""

    def __init__(self, schema: FeatureSchema, config: DqmConfig | None = None) -> None:
        super().__init__()
        self.config = config or DqmConfig()
        cfg = self.config
        self.embeddings = EmbeddingCollection(schema, sparse=cfg.sparse_embeddings,
                                              init_std=cfg.init_std)
        self.user_names = schema.names("user")
        self.behaviour_names = schema.names("behaviour")
        self.ad_names = schema.names("ad")
        self.scene_names = schema.names("scene")
        user_in = self.embeddings.dim(self.user_names) + self.embeddings.dim(self.behaviour_names)
        extra = 1 if cfg.ad_bias else 0
        self.user_tower = MLP(user_in, cfg.hidden, "relu", 0.0, cfg.out_dim)
        self.scene_tower = MLP(self.embeddings.dim(self.scene_names), cfg.hidden, "relu", 0.0,
                               cfg.out_dim)
        self.ad_tower = MLP(self.embeddings.dim(self.ad_names), cfg.hidden, "relu", 0.0,
                            cfg.out_dim + extra)
        # A global intercept folded into every ad's bias dimension (CTRs are far from 0.5).
        self.global_bias = nn.Parameter(torch.zeros(1)) if cfg.ad_bias else None
        # (candidate feature, behaviour field) per match field: the two read the same table.
        self.match_fields: list[tuple[str, str]] = []
        self.match: InterestMatch | None = None
        self.match_weight: nn.Parameter | None = None
        if cfg.interest_match:
            self.match_fields = list(zip(query_names(schema), self.behaviour_names, strict=True))
            self.match = InterestMatch(len(self.match_fields))
            # w_f = 1: the match starts as a plain bonus in logit units, which the data rescales
            self.match_weight = nn.Parameter(torch.ones(len(self.match_fields)))

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

    @staticmethod
    def _cat(embs: Embedded, names: list[str]) -> torch.Tensor:
        return torch.cat([embs[n] for n in names], dim=-1)

    # Each tower reads an already embedded dict, so `forward` looks every feature up once
    # (the match reuses the ad and behaviour rows the towers read).

    def _user(self, embs: Embedded, mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(self._cat(embs, self.behaviour_names), mask)
        return self._pad(self.user_tower(torch.cat([self._cat(embs, self.user_names), pooled],
                                                   dim=-1)), 1.0)

    def _scene(self, embs: Embedded) -> torch.Tensor:
        return self._pad(self.scene_tower(self._cat(embs, self.scene_names)), 0.0)

    def _ad(self, embs: Embedded) -> torch.Tensor:
        vec = self.ad_tower(self._cat(embs, self.ad_names))
        if self.global_bias is None:
            return vec
        bias = vec[:, -1:] + self.global_bias
        return torch.cat([vec[:, :-1], bias], dim=-1)

    def _match(self, embs: Embedded, mask: torch.Tensor) -> torch.Tensor:
        if self.match is None:
            raise ValueError("this DQM was built without interest_match")
        return self.match([(embs[q], embs[b]) for q, b in self.match_fields], mask)

    def user_vector(self, batch: Batch) -> torch.Tensor:
        """[B, vector_dim] from user and behaviour features (bias slot = 1)."""
        embs = self.embeddings.lookup(batch, self.user_names + self.behaviour_names)
        return self._user(embs, self.embeddings.sequence_mask(batch))

    def scene_vector(self, batch: Batch) -> torch.Tensor:
        """[B, vector_dim] from scene features (bias slot = 0, so the bias counts once)."""
        return self._scene(self.embeddings.lookup(batch, self.scene_names))

    def ad_vector(self, batch: Batch) -> torch.Tensor:
        """[N, vector_dim] from ad features only; the last slot holds the ad's bias."""
        return self._ad(self.embeddings.lookup(batch, self.ad_names))

    def interest_match(self, batch: Batch) -> torch.Tensor:
        """[B, fields] match per (candidate feature, behaviour field) in `match_fields`."""
        names = [q for q, _ in self.match_fields] + self.behaviour_names
        return self._match(self.embeddings.lookup(batch, dict.fromkeys(names)),
                           self.embeddings.sequence_mask(batch))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Click logit per row, [B]."""
        embs = self.embeddings.lookup(batch, self.embeddings.feature_names)
        mask = self.embeddings.sequence_mask(batch)
        query = self._user(embs, mask) + self._scene(embs)
        logit = (query * self._ad(embs)).sum(-1)
        if self.match_weight is None:
            return logit
        return logit + self._match(embs, mask) @ self.match_weight

    @staticmethod
    def score(query: torch.Tensor, ad_matrix: torch.Tensor) -> torch.Tensor:
        """Serving: inner-product logits [N] for query = user_vector + scene_vector ([1, d] or
        [d]); with `interest_match`, the pre-ranker adds the match term (see its module)."""
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
