"""DSSM two-tower retrieval: a user tower and an ad tower meeting only in a cosine.

Why the towers never read each other's features: the ad vectors are computed once into a faiss
index and the user vector once per request, so any cross feature would be unservable. A new ad
gets its vector from its own features alone (`ad_vector`), without retraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.features.schema import FeatureSchema
from models.nn.config import TwoTowerConfig
from models.nn.layers import MLP, Batch, EmbeddingCollection, masked_mean

CANDIDATE = "cand:"  # prefix of the sampled candidates' ad features in a distillation batch


class TwoTower(nn.Module):
    """User tower: profile + mean-pooled behaviour. Ad tower: ad features. Both L2-normalised.

    Example::

        model = TwoTower(schema)
        loss = model.in_batch_loss(clicked_batch, log_q)   # sampled softmax, logQ-corrected
        faiss_matrix = model.ad_vector(catalog)             # [N_ads, out_dim]
    """

    def __init__(self, schema: FeatureSchema, config: TwoTowerConfig | None = None) -> None:
        super().__init__()
        self.config = config or TwoTowerConfig()
        cfg = self.config
        self.embeddings = EmbeddingCollection(
            schema, ("user", "behaviour", "ad"), cfg.sparse_embeddings, cfg.init_std
        )
        user_in = self.embeddings.group_dim("user") + self.embeddings.group_dim("behaviour")
        self.user_tower = MLP(user_in, cfg.hidden, "relu", 0.0, cfg.out_dim)
        self.ad_tower = MLP(self.embeddings.group_dim("ad"), cfg.hidden, "relu", 0.0, cfg.out_dim)
        self.ad_key = schema.names("ad")[0]

    def user_vector(self, batch: Batch) -> torch.Tensor:
        """[B, out_dim] unit vectors from user and behaviour features only."""
        behaviour = self.embeddings(batch, "behaviour")
        pooled = masked_mean(behaviour, self.embeddings.sequence_mask(batch))
        x = torch.cat([self.embeddings(batch, "user"), pooled], dim=-1)
        return F.normalize(self.user_tower(x), dim=-1)

    def ad_vector(self, batch: Batch) -> torch.Tensor:
        """[N, out_dim] unit vectors from ad features only (works for a never-seen ad)."""
        return F.normalize(self.ad_tower(self.embeddings(batch, "ad")), dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Row-wise logit cos(u, a) / temperature, [B]."""
        return (self.user_vector(batch) * self.ad_vector(batch)).sum(-1) / self.config.temperature

    def in_batch_loss(self, batch: Batch, log_q: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax over in-batch ads with logQ correction (Yi et al., 2019).

        Every row is a positive (user, ad) pair; the other rows' ads are its negatives. Popular
        ads appear as negatives more often than uniform sampling would, so each column's logit
        is lowered by log q(ad), its sampling probability. Columns holding the same ad as the
        row's positive are removed, so a duplicate is never pushed away from itself.
        """
        user = self.user_vector(batch)
        ads = self.ad_vector(batch)
        logits = user @ ads.T / self.config.temperature
        if log_q is not None:
            logits = logits - log_q.to(logits.dtype).unsqueeze(0)
        ad_ids = batch[self.ad_key]
        same_ad = ad_ids.unsqueeze(1) == ad_ids.unsqueeze(0)
        eye = torch.eye(len(ad_ids), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same_ad & ~eye, float("-inf"))
        target = torch.arange(len(ad_ids), device=logits.device)
        return F.cross_entropy(logits, target)

    def distill_loss(self, batch: Batch) -> torch.Tensor:
        """Listwise distillation from the ranker over sampled candidates.

        `batch["teacher"]` [B, S] holds the ranker's log pCTR of S sampled ads per row, whose
        ad features are `batch[CANDIDATE + name]` [B, S]. KL(softmax(teacher) || softmax(
        cos / temperature)): the tower learns the ranker's order among ads it never saw
        clicked, and at the ranker's scale (log pCTR), which is what a value-aware index
        adds log eCPM to.
        """
        user = self.user_vector(batch)
        names = self.embeddings.schema.names("ad")
        shape = batch[CANDIDATE + names[0]].shape
        cands = {n: batch[CANDIDATE + n].reshape(-1) for n in names}
        ads = self.ad_vector(cands).reshape(shape[0], shape[1], -1)
        student = torch.einsum("bd,bsd->bs", user, ads) / self.config.temperature
        target = F.softmax(batch["teacher"].to(student.dtype), dim=-1)
        return F.kl_div(F.log_softmax(student, dim=-1), target, reduction="batchmean")

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """`in_batch_loss` with `log_q` read from the batch when present, plus the ranker
        distillation when the batch carries teacher scores."""
        loss = self.in_batch_loss(batch, batch.get("log_q"))
        if "teacher" in batch and self.config.distill_weight > 0:
            loss = loss + self.config.distill_weight * self.distill_loss(batch)
        return loss

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        return self.embeddings.mba_l2(batch, lam)


def estimate_log_q(ad_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows] table of log sampling probability per encoded ad row.

    Pass the encoded `ad_id` of every training positive; index the result with a batch's
    `ad_id` to get its `log_q`. Unseen rows get the probability of one occurrence (they never
    occur as in-batch negatives during training, so the value only has to be finite).
    """
    counts = torch.bincount(ad_rows.reshape(-1), minlength=num_rows).to(torch.float64)
    total = counts.sum().clamp(min=1.0)
    return torch.log(counts.clamp(min=1.0) / total).to(torch.float32)
