"""The cascade: six named steps within one request deadline, each with its K, budget and fallback.

Read `STEPS` first: it is the whole request path in order, in one place (product-mixer style).

    features  store: profile + behaviour sequence + frequency caps, one round trip
    recall    retrieval stage: top K1 (faiss) or its cold-start channel
    screen    local: eligibility + top K2 by the Qscore eCPM estimate (screening.py)
    prerank   DQM stage: top K3
    rank      DIN/ESMM stage: pCTR, pCVR for the K3 candidates
    auction   local: eCPM, per-scene reserve, GSP per click, one ad per campaign (auction.py)

Deadlines: the request's absolute deadline is fixed on arrival. A step may use whatever is left,
minus what the later steps are guaranteed (`reserve_share` x the request budget, summed over the
later steps); so a hung retrieval cannot starve ranking of its share. A remote step that fails or
misses its deadline is skipped and the order of the step before stands (DIN -> DQM -> Qscore); the
response marks it `degraded` with the reason. Nothing in a stage failure becomes a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from services.common import wire
from services.common.deadline import Deadline, DeadlineExceeded
from services.common.store import OnlineStore, UserContext
from services.gateway.auction import Candidate, Reserve, Winner, run_auction
from services.gateway.catalog import Catalog
from services.gateway.clients import StageClient
from services.gateway.screening import (
    QscoreTable,
    Screened,
    ScreenPolicy,
    click_value,
    qscore_estimate,
    screen,
)
from services.gateway.tokens import TokenSigner

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One step of the request path: its cut (K), its guaranteed budget share, its fallback."""

    name: str
    k: int | None
    reserve_share: float  # share of the request budget kept for this step by earlier steps
    remote: bool
    fallback: str


STEPS: tuple[Step, ...] = (
    Step("features", None, 0.10, False, "cold-start path (no profile, empty sequence)"),
    Step("recall", 2000, 0.20, True, "local cold-start pool: the scene's top 2 x K1 by Qscore"),
    Step("screen", 2000, 0.05, False, "none: an unscreened ad is never served (no slots)"),
    Step("prerank", 200, 0.20, True, "Qscore order, top K3"),
    Step("rank", None, 0.30, True, "DQM order (else Qscore); pCTR = Qscore, pCVR = prior"),
    Step("auction", None, 0.05, False, "none: no slots"),
)
STEP = {s.name: s for s in STEPS}
DEBUG_TOP = 20
FALLBACK_TTL_S = 30.0  # how long a scene's local cold-start pool is reused


@dataclass(frozen=True)
class SceneRules:
    """Per-scene serving rules: the most slots a request may ask for and the reserve."""

    max_slots: int
    reserve: Reserve


DEFAULT_SCENES: dict[str, SceneRules] = {
    "home_feed": SceneRules(8, Reserve(ecpm_micros=200_000, cpc_micros=10_000)),
    "search": SceneRules(6, Reserve(ecpm_micros=400_000, cpc_micros=10_000)),
    "product_detail": SceneRules(4, Reserve(ecpm_micros=200_000, cpc_micros=10_000)),
}


@dataclass(frozen=True)
class GatewayConfig:
    """Every gateway knob (defaults here; `from_settings` reads settings.extra['gateway'])."""

    k1: int = STEP["recall"].k or 2000
    k2: int = STEP["screen"].k or 2000
    k3: int = STEP["prerank"].k or 200
    freq_cap: int = 5  # impressions per campaign per user per UTC day
    prior_cvr: float = 0.05  # used when the bundle records none
    rank_fallback_factor: int = 4  # with rank degraded, the top factor x slots enter the auction
    scenes: dict[str, SceneRules] = field(default_factory=lambda: dict(DEFAULT_SCENES))
    catalog_refresh_s: float = 1.0
    qscore_refresh_s: float = 5.0
    dedupe_window_s: float = 86_400.0
    max_body_bytes: int = 1024 * 1024

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatewayConfig:
        data = dict(data)
        if "scenes" in data:
            data["scenes"] = {
                name: SceneRules(int(rule.get("max_slots", 8)),
                                 Reserve(float(rule.get("reserve_ecpm_micros", 0.0)),
                                         int(rule.get("reserve_cpc_micros", 0))))
                for name, rule in data["scenes"].items()}
        return cls(**data)


@dataclass
class StageRecord:
    """What one step did (becomes a `StageReport`, plus debug candidates)."""

    name: str
    count_in: int = 0
    count_out: int = 0
    ms: float = 0.0
    degraded: bool = False
    reason: str = ""
    top: list[wire.DebugCandidate] = field(default_factory=list)


@dataclass
class CascadeResult:
    """The response plus what side effects need (served-feature log, pacing holds)."""

    response: wire.AdsResponse
    winners: list[Winner]
    user: UserContext
    stage_context: dict[str, Any]


def _top(ids: np.ndarray, scores: np.ndarray, n: int = DEBUG_TOP) -> list[wire.DebugCandidate]:
    return [wire.DebugCandidate(ad_id=int(a), score=float(s))
            for a, s in zip(ids[:n].tolist(), scores[:n].tolist(), strict=True)]


class Cascade:
    """Runs the six steps for one `AdsRequest` with the given stage clients."""

    def __init__(self, *, config: GatewayConfig, store: OnlineStore, catalog: Catalog,
                 qscores: QscoreTable, pacing: Callable[[set[int]], set[int]],
                 signer: TokenSigner, retrieval: StageClient, prerank: StageClient,
                 rank: StageClient, prior_cvr: float | None = None, budget_ms: float = 50.0,
                 model_version: Callable[[], str] = lambda: "") -> None:
        self.config = config
        self.store, self.catalog, self.qscores = store, catalog, qscores
        self.pacing, self.signer = pacing, signer
        self.retrieval, self.prerank, self.rank = retrieval, prerank, rank
        self.prior_cvr = prior_cvr if prior_cvr is not None else config.prior_cvr
        self.model_version = model_version
        self.budget_ms = budget_ms  # default request budget (CASCADE_BUDGET_MS)
        self._fallback: dict[str, tuple[int, float, np.ndarray]] = {}

    # -- local fallback for recall ----------------------------------------------------------------
    async def _fallback_pool(self, scene: str) -> np.ndarray:
        """The scene's top 2 x K1 eligible ads by the Qscore eCPM estimate.

        Bounded on purpose: screening the whole catalog when retrieval fails would cost a
        million-ad scan per request exactly when the gateway is overloaded. Recomputed off the
        event loop when the catalog changes or every `FALLBACK_TTL_S`.
        """
        cached = self._fallback.get(scene)
        now = time.monotonic()
        if cached and cached[0] == self.catalog.version and now - cached[1] < FALLBACK_TTL_S:
            return cached[2]
        pool = await asyncio.to_thread(self._compute_fallback, scene)
        self._fallback[scene] = (self.catalog.version, now, pool)
        return pool

    def _compute_fallback(self, scene: str) -> np.ndarray:
        c = self.catalog.cols
        rows = np.flatnonzero(c.active & ((c.scene_bits & self.catalog.scene_bit(scene)) != 0))
        k = min(rows.size, 2 * self.config.k1)
        if rows.size > k:
            estimate = qscore_estimate(self.catalog, rows, self.qscores.ctr(c.ad_ids[rows]),
                                       self.prior_cvr)
            rows = rows[np.argpartition(-estimate, k - 1)[:k]]
        return c.ad_ids[rows]

    # -- deadlines and guarded calls ------------------------------------------------------------
    def _step_deadline(self, step: Step, deadline: Deadline, budget_ms: float) -> Deadline:
        later = STEPS[STEPS.index(step) + 1:]
        keep_ms = sum(s.reserve_share for s in later) * budget_ms
        return deadline.child(max(0.0, deadline.remaining_ms() - keep_ms))

    async def _guarded(self, record: StageRecord, deadline: Deadline,
                       call: Callable[[Deadline], Awaitable[T]]) -> T | None:
        """Run a step's call within its deadline; None (and the record degraded) on failure."""
        started = time.perf_counter()
        try:
            if deadline.remaining_ms() <= 0:
                raise DeadlineExceeded("no budget left")
            return await asyncio.wait_for(call(deadline), timeout=deadline.remaining_s())
        except (TimeoutError, DeadlineExceeded) as exc:
            record.degraded, record.reason = True, f"deadline exceeded: {exc}".rstrip(": ")
        except Exception as exc:  # noqa: BLE001 - a stage failure is a degraded answer
            record.degraded = True
            record.reason = f"failed: {type(exc).__name__}: {exc}"[:300]
            log.warning("stage %s failed: %s", record.name, record.reason)
        finally:
            record.ms = (time.perf_counter() - started) * 1000
        return None

    # -- the request path ------------------------------------------------------------------------
    async def run(self, request: wire.AdsRequest) -> CascadeResult:
        budget_ms = request.budget_ms or self.budget_ms
        deadline = Deadline.after_ms(budget_ms)
        records = {s.name: StageRecord(s.name) for s in STEPS}
        cfg, now = self.config, time.time()
        hour = request.context.hour if request.context.hour is not None else \
            datetime.fromtimestamp(now, tz=UTC).hour

        # 1 features
        rec = records["features"]
        user = await self._guarded(rec, self._step_deadline(STEP["features"], deadline,
                                                            budget_ms),
                                   lambda d: self.store.get_user_context(request.user_id))
        if user is None:
            user = UserContext(profile=None)
        rec.count_out = int(user.known)
        context: dict[str, wire.ScalarValue] = {"hour": hour, "position": 0}
        if request.context.device:
            context["device"] = request.context.device
        part = dict(request_id=request.request_id, user_id=request.user_id, scene=request.scene,
                    user={k: v for k, v in (user.profile or {}).items() if k != "user_id"},
                    hist=self._hist(user), context=context)

        # 2 recall
        rec = records["recall"]
        recalled = await self._guarded(
            rec, self._step_deadline(STEP["recall"], deadline, budget_ms),
            lambda d: self.retrieval.call(wire.RecallRequest(**part, k=cfg.k1), d))
        if recalled is not None:
            candidates = recalled.ad_ids
            rec.top = _top(recalled.ad_ids, recalled.scores)
        else:  # local cold-start channel: the scene's best ads by Qscore eCPM (cached)
            candidates = await self._fallback_pool(request.scene)
        rec.count_out = int(candidates.size)

        # 3 screen
        rec = records["screen"]
        rec.count_in = int(candidates.size)
        started = time.perf_counter()
        try:
            screened = screen(candidates, scene=request.scene, caps=user.caps,
                              catalog=self.catalog, qscores=self.qscores, pacing=self.pacing,
                              policy=ScreenPolicy(cfg.k2, cfg.freq_cap, self.prior_cvr))
        except Exception as exc:  # noqa: BLE001 - never serve unscreened ads
            log.exception("screening failed")
            rec.degraded, rec.reason = True, f"failed: {type(exc).__name__}: {exc}"[:300]
            none = np.empty(0, np.int64)
            screened = Screened(none, none, np.empty(0), np.empty(0), {})
        rec.ms = (time.perf_counter() - started) * 1000
        rec.count_out = int(screened.ad_ids.size)
        rec.top = _top(screened.ad_ids, screened.estimate)
        qctr = dict(zip(screened.ad_ids.tolist(), screened.qctr.tolist(), strict=True))

        # 4 prerank
        rec = records["prerank"]
        rec.count_in = int(screened.ad_ids.size)
        order, scores = screened.ad_ids[:cfg.k3], screened.estimate[:cfg.k3]
        if screened.ad_ids.size:
            pre = await self._guarded(
                rec, self._step_deadline(STEP["prerank"], deadline, budget_ms),
                lambda d: self.prerank.call(wire.PrerankRequest(
                    **part, k=cfg.k3, ad_ids=screened.ad_ids,
                    values=click_value(self.catalog, screened.rows, self.prior_cvr)), d))
            if pre is not None:
                order, scores = pre.ad_ids[:cfg.k3], pre.scores[:cfg.k3]
        rec.count_out = int(order.size)
        rec.top = _top(order, scores)

        # 5 rank
        rec = records["rank"]
        rec.count_in = int(order.size)
        ranked = None
        if order.size:
            ranked = await self._guarded(
                rec, self._step_deadline(STEP["rank"], deadline, budget_ms),
                lambda d: self.rank.call(wire.RankRequest(
                    **part, ad_ids=order, ad_features=self._ad_features(order)), d))
        if ranked is not None:
            ids, pctr, pcvr = ranked.ad_ids, ranked.pctr, ranked.pcvr
        else:
            ids = order[:max(cfg.rank_fallback_factor * request.slots, request.slots)]
            pctr = np.asarray([qctr.get(a, self.qscores.prior.prior_mean)
                               for a in ids.tolist()], np.float32)
            pcvr = np.full(ids.size, self.prior_cvr, np.float32)
        rec.count_out = int(ids.size)
        rec.top = _top(ids, pctr)

        # 6 auction
        rec = records["auction"]
        rec.count_in = int(ids.size)
        started = time.perf_counter()
        winners = run_auction(self._candidates(ids, pctr, pcvr), request.slots,
                              cfg.scenes[request.scene].reserve)
        slots = [self._slot(w, request, now) for w in winners]
        rec.ms = (time.perf_counter() - started) * 1000
        rec.count_out = len(slots)
        rec.top = [wire.DebugCandidate(ad_id=w.ad_id, score=w.ecpm) for w in winners]

        response = wire.AdsResponse(
            request_id=request.request_id, slots=slots,
            stages=[wire.StageReport(name=r.name, count_in=r.count_in, count_out=r.count_out,
                                     ms=round(r.ms, 3), degraded=r.degraded, reason=r.reason)
                    for r in records.values()],
            degraded=any(r.degraded for r in records.values()),
            model_version=ranked.info.model_version if ranked is not None
            else self.model_version(),
            debug=[wire.DebugStage(name=r.name, candidates=r.top) for r in records.values()]
            if request.debug else [])
        return CascadeResult(response, winners, user, {"hour": hour, "ts": now, **part})

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _hist(user: UserContext) -> dict[str, wire.Column]:
        """The behaviour columns; none at all for an empty sequence, so a user with nothing
        to go on takes retrieval's cold-start channel instead of a featureless user vector."""
        if not user.hist_ad_id:
            return {}
        return {"hist_ad_id": wire.Column(ints=np.asarray(user.hist_ad_id, np.int64)),
                "hist_category_id": wire.Column(ints=np.asarray(user.hist_category_id,
                                                                np.int64))}

    def _ad_features(self, ad_ids: np.ndarray) -> dict[str, wire.Column]:
        """Raw ad features from the catalog snapshot (so a brand-new ad ranks on its own)."""
        ads = [self.catalog.ads[a] for a in ad_ids.tolist()]
        ints = {name: np.fromiter((getattr(a, name) for a in ads), np.int64, len(ads))
                for name in ("ad_id", "campaign_id", "advertiser_id", "category_id",
                             "brand_id", "price_bucket")}
        out = {name: wire.Column(ints=values) for name, values in ints.items()}
        out["bid_type"] = wire.Column(strs=[a.bid_type for a in ads])
        return out

    def _candidates(self, ids: np.ndarray, pctr: np.ndarray,
                    pcvr: np.ndarray) -> list[Candidate]:
        out = []
        for ad_id, ctr, cvr in zip(ids.tolist(), pctr.tolist(), pcvr.tolist(), strict=True):
            ad = self.catalog.ads.get(ad_id)
            if ad is None:
                continue
            out.append(Candidate(ad_id, ad.campaign_id, ad.bid_type, ad.bid_micros,
                                 ad.target_cpa_micros, float(ctr), float(cvr)))
        return out

    def _slot(self, winner: Winner, request: wire.AdsRequest, now: float) -> wire.AdSlot:
        ad = self.catalog.ads[winner.ad_id]
        token = self.signer.sign(request_id=request.request_id, ad_id=ad.ad_id,
                                 campaign_id=ad.campaign_id, user_id=request.user_id,
                                 scene=request.scene, price_micros=winner.price_micros,
                                 category_id=ad.category_id, position=winner.slot, now=now)
        return wire.AdSlot(position=winner.slot, ad_id=ad.ad_id, campaign_id=ad.campaign_id,
                           creative_id=ad.creative_id, price_micros=winner.price_micros,
                           pctr=winner.candidate.pctr, pcvr=winner.candidate.pcvr,
                           ecpm=round(winner.ecpm, 3), token=token)
