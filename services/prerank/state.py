"""The pre-ranking stage's state: a `PreRanker` loaded from a bundle, and its wire methods.

Bundle files read: `dqm.safetensors` (+ its config in manifest["models"]["dqm"]) and
`dqm_ad_vectors.safetensors` ("vectors" float32 [N, d], "ad_ids" int64 [N]).

`handle(PrerankRequest) -> PrerankResponse` is what both the HTTP app and the gateway's
in-process client call, so the two paths cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.bundle import read_bundle
from services.common import wire
from services.common.deadline import Deadline
from services.prerank.preranker import PreRanker, PrerankQuery


@dataclass
class PrerankState:
    """One loaded bundle's pre-ranker."""

    version: str
    preranker: PreRanker

    def handle(self, request: wire.PrerankRequest,
               deadline: Deadline | None = None) -> wire.PrerankResponse:
        if deadline is not None:
            deadline.check("pre-ranking")
        result = self.preranker.prerank(PrerankQuery(
            ad_ids=request.ad_ids, scene=request.scene, user=request.user, hist=request.hist,
            context=request.context, k=request.k, values=request.values))
        return wire.PrerankResponse(ad_ids=result.ad_ids, scores=result.scores,
                                    info=wire.StageInfo(model_version=self.version))

    def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse:
        """A new ad (or changed features) gets its DQM vector from the ad tower. A status-only
        change of a known ad needs nothing here: eligibility is screened before pre-ranking."""
        known = self.preranker.ads.row(update.ad_id) is not None
        if known and not update.features:
            return wire.CatalogUpdateResponse(ad_id=update.ad_id, status=update.status)
        if not known and not update.features:
            raise ValueError(f"ad {update.ad_id} is new: its features are required "
                             "(field 'features')")
        added = self.preranker.add_ad(update.ad_id, dict(update.features))
        return wire.CatalogUpdateResponse(ad_id=update.ad_id, status=update.status, added=added)


def load_prerank_state(path: str, *, threads: int = 1) -> PrerankState:
    """Load a bundle (version dir or BUNDLES root) into a ready PrerankState."""
    bundle = read_bundle(path)
    return PrerankState(version=bundle.version,
                        preranker=PreRanker.from_bundle(bundle, threads=threads))
