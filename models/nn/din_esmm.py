"""DIN + ESMM ranker: one DIN backbone, a CTR tower and a CVR tower, pCTCVR = pCTR × pCVR.

Why ESMM: a CVR model trained on clicked impressions only learns from a biased sample but is
served on every impression (sample-selection bias). ESMM trains the CVR tower over all
impressions, only through the product pCTCVR, and never divides pCTCVR by pCTR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.features.schema import FeatureSchema
from models.nn.backbone import DinBackbone
from models.nn.config import RankerConfig
from models.nn.layers import MLP, Batch, log_odds


def esmm_losses(
    ctr_logit: torch.Tensor,
    cvr_logit: torch.Tensor,
    click: torch.Tensor,
    conversion: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """BCE(pCTR, click) and BCE(pCTCVR, click·conversion), both averaged over all impressions.

    Computed in log space so that saturated probabilities stay finite:
    log pCTCVR = logσ(a) + logσ(b), and 1 − pq = (1 − p) + p(1 − q) gives
    log(1 − pCTCVR) = logaddexp(logσ(−a), logσ(a) + logσ(−b)), with no clamp and no division.
    """
    click = click.to(ctr_logit.dtype)
    ctcvr = click * conversion.to(ctr_logit.dtype)
    ctr = F.binary_cross_entropy_with_logits(ctr_logit, click)
    log_pctr = F.logsigmoid(ctr_logit)
    log_pctcvr = log_pctr + F.logsigmoid(cvr_logit)
    log_not = torch.logaddexp(F.logsigmoid(-ctr_logit), log_pctr + F.logsigmoid(-cvr_logit))
    ctcvr_loss = -(ctcvr * log_pctcvr + (1.0 - ctcvr) * log_not).mean()
    return {"ctr": ctr, "ctcvr": ctcvr_loss}


def clicked_cvr_loss(cvr_logit: torch.Tensor, click: torch.Tensor,
                     conversion: torch.Tensor) -> torch.Tensor:
    """BCE(pCVR, conversion) summed over the clicked rows, divided by ALL rows of the batch.

    Why, beside the entire-space loss: through the product, a clicked impression that did not
    convert pushes pCVR down with a gradient damped by pCTR (d log(1 - pq)/db ~ -p q), so the
    CVR tower barely learns from the rows that separate converters from non-converters among
    clicks. This term gives them their full weight (ESCM2's point). Dividing by the batch, not
    by the clicked rows, keeps it on the scale of the CTCVR loss, and it is 0 without clicks.
    """
    click = click.to(cvr_logit.dtype)
    per_row = F.binary_cross_entropy_with_logits(
        cvr_logit, conversion.to(cvr_logit.dtype), reduction="none")
    return (per_row * click).sum() / max(cvr_logit.numel(), 1)


def heads_output(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ranker's output dict (logits for the loss, probabilities for serving and eval)."""
    pctr = torch.sigmoid(ctr_logit)
    pcvr = torch.sigmoid(cvr_logit)
    return {
        "ctr_logit": ctr_logit,
        "cvr_logit": cvr_logit,
        "pctr": pctr,
        "pcvr": pcvr,
        "pctcvr": pctr * pcvr,
    }


class AdOffsets(nn.Module):
    """Per ad-id row, a fixed offset added to the CTR and the CVR logit (a [rows, 2] buffer).

    Why: what carries over to new users and later days is largely each ad's own appeal, which
    counting measures directly (Qscore's smoothed CTR) and the network reaches only through
    the ad's embedding, trained for as long as validation allows. The trainer fits, on the
    validation rows, how much of the ads' counted log-odds to add to the network's logits
    (`models.train.calibrate.fit_blend`) and stores the weighted offsets here; where the counts
    add nothing the weight is ~0. It is not trained by gradient: learning a free offset per ad
    id overfits the few impressions most ads have (measured on the simulator's `small`).
    """

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.zeros(rows, 2))

    def forward(self, ad_rows: torch.Tensor) -> torch.Tensor:
        """[N, 2] (CTR, CVR) for the ad-id rows [N]."""
        return self.offsets[ad_rows.reshape(-1)]


class DinEsmm(nn.Module):
    """DIN backbone (embeddings + activation unit) shared by a CTR and a CVR Dice tower.

    Example::

        model = DinEsmm(schema)
        out = model(batch)  # ctr_logit, cvr_logit, pctr, pcvr, pctcvr, each [B]
        loss = model.loss(out, batch["click"], batch["conversion"]) + model.mba_l2(batch, 1e-5)
    """

    def __init__(self, schema: FeatureSchema, config: RankerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RankerConfig()
        cfg = self.config
        self.backbone = DinBackbone(schema, cfg)
        width = self.backbone.out_dim
        self.ctr_tower = MLP(width, cfg.tower_hidden, cfg.tower_activation, cfg.dropout, 1)
        self.cvr_tower = MLP(width, cfg.tower_hidden, cfg.tower_activation, cfg.dropout, 1)
        self.ad_offsets = AdOffsets(schema["ad_id"].rows) if cfg.ad_offsets else None

    def init_base_rates(self, ctr: float, cvr: float) -> None:
        """Start both towers at the data's CTR and CVR (see `MLP.init_output_bias`)."""
        self.ctr_tower.init_output_bias(log_odds(ctr))
        self.cvr_tower.init_output_bias(log_odds(cvr))

    def _heads(self, features: torch.Tensor, ads: Batch) -> dict[str, torch.Tensor]:
        ctr = self.ctr_tower(features).squeeze(-1)
        cvr = self.cvr_tower(features).squeeze(-1)
        if self.ad_offsets is not None:
            offsets = self.ad_offsets(ads["ad_id"])
            ctr, cvr = ctr + offsets[:, 0], cvr + offsets[:, 1]
        return heads_output(ctr, cvr)

    @torch.no_grad()
    def set_ad_offsets(self, head: str, offsets: torch.Tensor) -> None:
        """Serve `offsets` [ad_id rows] on `head` ("ctr" or "cvr"); the pad row stays 0."""
        if self.ad_offsets is None:
            raise RuntimeError("this model was built without ad_offsets")
        column = self.ad_offsets.offsets[:, ("ctr", "cvr").index(head)]
        column.copy_(offsets.to(column.dtype))
        column[0] = 0.0

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self._heads(self.backbone(batch), batch)

    def loss(
        self, out: dict[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> torch.Tensor:
        """BCE(pCTR, click) + BCE(pCTCVR, click·conversion), plus `cvr_click_weight` x the
        clicked rows' CVR loss (`clicked_cvr_loss`; 0: pure ESMM)."""
        parts = esmm_losses(out["ctr_logit"], out["cvr_logit"], click, conversion)
        total = parts["ctr"] + parts["ctcvr"]
        weight = self.config.cvr_click_weight
        if weight > 0:
            total = total + weight * clicked_cvr_loss(out["cvr_logit"], click, conversion)
        return total

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Loss with labels read from the batch (`click`, `conversion`)."""
        return self.loss(self(batch), batch["click"], batch["conversion"])

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        """Mini-batch-aware L2 over the embedding rows this batch reads."""
        return self.backbone.embeddings.mba_l2(batch, lam)

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """pctr, pcvr and pctcvr per row (eval uses this for every model alike)."""
        out = self(batch)
        return {k: out[k] for k in ("pctr", "pcvr", "pctcvr")}

    def score_candidates(
        self, user: Batch, candidates: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Serving: (pctr, pcvr, pctcvr), each [N], for one user and N candidates.

        `user`: user features [1] and behaviour sequences [1, L]; `candidates`: ad features [N]
        and scene features [N] or [1] (scene may also sit in `user`). The history is embedded
        once and the attention's first layer is decomposed; equals `forward` on the expanded
        batch to float tolerance. Needs eval mode: Dice must use its running statistics.
        """
        if self.training:
            raise RuntimeError("score_candidates needs model.eval() (Dice running statistics)")
        out = self._heads(self.backbone.candidate_features(user, candidates), candidates)
        return out["pctr"], out["pcvr"], out["pctcvr"]
