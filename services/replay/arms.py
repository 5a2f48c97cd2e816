"""The replay's arms: each is the real gateway with a different choice of stage states.

Every arm runs the same Cascade code (features -> recall -> screen -> prerank -> rank ->
auction), the same screening (status, scene, pacing, frequency caps) and the same second-price
auction; arms differ only in what stands in each stage, composed from the outside:

    cascade      the bundle's two-tower recall, DQM, DIN+ESMM at the gateway's K's (as served)
    full-ranker  the whole eligible corpus -> DIN+ESMM (the models' own upper bound)
    oracle       the whole eligible corpus -> the simulator's true pCTR and pCVR (the ceiling)
    qscore-only  the whole eligible corpus -> top K2 by Qscore eCPM, priced by Qscore CTR and
                 the prior CVR (no model at all)
    dqm-only     the whole eligible corpus -> DQM top K3, priced by the DQM's pCTR and the prior

"Whole eligible corpus" means recall returns every ad servable in the scene and screening keeps
all of them (K2 unbounded), so eligibility (caps, pacing) is applied exactly as for the cascade.
A `Recorder` around each stage client notes what each stage handed on, for the funnel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.data.truth import Truth
from services.common import wire
from services.common.deadline import Deadline
from services.gateway.catalog import Catalog

ARMS = ("cascade", "full-ranker", "oracle", "qscore-only", "dqm-only")
UNBOUNDED = 1 << 30  # a K that keeps every candidate
RANK_CHUNK = 4096  # candidates per DIN+ESMM call: bounds the attention's memory


class CatalogHolder:
    """Late binding to the arm's own catalog (the gateway builds it after the stages)."""

    catalog: Catalog | None = None

    def view(self) -> Any:
        if self.catalog is None:
            raise RuntimeError("stage used before its gateway's catalog was bound")
        return self.catalog


@dataclass
class CorpusRecall(CatalogHolder):
    """Recall that returns every ad servable in the scene (active, targeted, campaign on)."""

    version: str = "corpus"

    def handle(self, request: wire.RecallRequest,
               deadline: Deadline | None = None) -> wire.RecallResponse:
        catalog = self.view()
        ids = catalog.view.ads.ad_id[catalog.servable(request.scene)]
        return wire.RecallResponse(ad_ids=ids, scores=np.zeros(ids.size, np.float32),
                                   channel="corpus", eligible=int(ids.size))


@dataclass
class PassThroughPrerank:
    """Pre-ranking that keeps screening's order (Qscore eCPM), top k."""

    version: str = "pass-through"

    def handle(self, request: wire.PrerankRequest,
               deadline: Deadline | None = None) -> wire.PrerankResponse:
        ids = np.asarray(request.ad_ids, np.int64)[:request.k]
        return wire.PrerankResponse(ad_ids=ids, scores=np.zeros(ids.size, np.float32))


@dataclass
class ChunkedRank:
    """The bundle's DIN+ESMM over any number of candidates, in chunks (same model, same
    scores: only memory differs from one call)."""

    state: Any  # services.rank.state.RankState

    @property
    def version(self) -> str:
        return str(self.state.version)

    def handle(self, request: wire.RankRequest,
               deadline: Deadline | None = None) -> wire.RankResponse:
        ids = np.asarray(request.ad_ids, np.int64)
        parts = [self.state.handle(request.model_copy(update={"ad_ids": ids[s:s + RANK_CHUNK]}))
                 for s in range(0, ids.size, RANK_CHUNK)]
        if not parts:
            return wire.RankResponse(info=wire.StageInfo(model_version=self.version))
        return wire.RankResponse(
            ad_ids=np.concatenate([p.ad_ids for p in parts]),
            pctr=np.concatenate([p.pctr for p in parts]),
            pcvr=np.concatenate([p.pcvr for p in parts]),
            pctcvr=np.concatenate([p.pctcvr for p in parts]),
            info=wire.StageInfo(model_version=self.version))


def request_history(request: wire.RankRequest | wire.RecallRequest) -> np.ndarray:
    """The behaviour sequence a stage request carries (ad ids, newest first)."""
    column = request.hist.get("hist_ad_id")
    return np.asarray(column.ints if column is not None and column.ints is not None else [],
                      np.int64)


@dataclass
class TruthRank:
    """Ranking by the simulator's true pCTR and pCVR (at the first slot: the auction ranks
    before it assigns slots, as it does with the models' position-free scores)."""

    truth: Truth
    version: str = "oracle"

    def handle(self, request: wire.RankRequest,
               deadline: Deadline | None = None) -> wire.RankResponse:
        ids = np.asarray(request.ad_ids, np.int64)
        pctr, pcvr = self.truth.request(int(request.user_id), request_history(request),
                                        request.scene, 0, ids)
        return wire.RankResponse(ad_ids=ids, pctr=pctr, pcvr=pcvr, pctcvr=pctr * pcvr,
                                 info=wire.StageInfo(model_version=self.version))


@dataclass
class QscoreRank(CatalogHolder):
    """Ranking with no model: the Qscore CTR and the prior CVR (what screening estimates)."""

    prior_cvr: float = 0.0
    version: str = "qscore"

    def handle(self, request: wire.RankRequest,
               deadline: Deadline | None = None) -> wire.RankResponse:
        catalog = self.view()
        ids = np.asarray(request.ad_ids, np.int64)
        rows = catalog.rows_of(ids)
        known = rows >= 0
        ids, pctr = ids[known], catalog.view.ads.qctr[rows[known]].astype(np.float32)
        pcvr = np.full(ids.size, self.prior_cvr, np.float32)
        return wire.RankResponse(ad_ids=ids, pctr=pctr, pcvr=pcvr, pctcvr=pctr * pcvr,
                                 info=wire.StageInfo(model_version=self.version))


@dataclass
class DqmRank:
    """Ranking by the DQM's pCTR (its sigmoid output) and the prior CVR."""

    prerank: Any  # services.prerank.state.PrerankState
    prior_cvr: float = 0.0
    version: str = "dqm"

    def handle(self, request: wire.RankRequest,
               deadline: Deadline | None = None) -> wire.RankResponse:
        ids = np.asarray(request.ad_ids, np.int64)
        if ids.size == 0:
            return wire.RankResponse(info=wire.StageInfo(model_version=self.version))
        out = self.prerank.handle(wire.PrerankRequest(
            scene=request.scene, user=request.user, hist=request.hist, context=request.context,
            ad_ids=ids, k=int(ids.size)))
        pctr = np.asarray(out.scores, np.float32)
        pcvr = np.full(pctr.size, self.prior_cvr, np.float32)
        return wire.RankResponse(ad_ids=out.ad_ids, pctr=pctr, pcvr=pcvr, pctcvr=pctr * pcvr,
                                 info=wire.StageInfo(model_version=self.version))


@dataclass
class StageTrace:
    """What each stage handed on for the current request (the funnel reads it)."""

    recalled: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    screened: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    preranked: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ranked: wire.RankResponse | None = None

    def reset(self) -> None:
        empty = np.empty(0, np.int64)
        self.recalled, self.screened, self.preranked, self.ranked = empty, empty, empty, None


class Recorder:
    """A stage client that notes its traffic in a `StageTrace` and passes the call on.

    Recall's answer is what recall kept; pre-ranking's request is what screening kept; the
    ranker's request is what pre-ranking kept (after any fallback), its answer the scores."""

    def __init__(self, inner: Any, trace: StageTrace) -> None:
        self.inner, self.trace, self.name = inner, trace, inner.name

    async def call(self, request: Any, deadline: Deadline) -> Any:
        if isinstance(request, wire.PrerankRequest):
            self.trace.screened = np.asarray(request.ad_ids, np.int64)
        elif isinstance(request, wire.RankRequest):
            self.trace.preranked = np.asarray(request.ad_ids, np.int64)
        response = await self.inner.call(request, deadline)
        if isinstance(response, wire.RecallResponse):
            self.trace.recalled = np.asarray(response.ad_ids, np.int64)
        elif isinstance(response, wire.RankResponse):
            self.trace.ranked = response
        return response

    def __getattr__(self, name: str) -> Any:  # ready, close, reload, ...: the inner client's
        return getattr(self.inner, name)
