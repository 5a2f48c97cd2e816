"""One arm of the replay, closed loop: serve, let the truth answer, feed the events back.

Per request, in order:
1. read the user's context from the arm's own store (the behaviour sequence the cascade will
   see is the one the truth must judge), and the eligible corpus for the funnel (screening with
   an unbounded K, the cascade's own pacing seed, before serving adds its pacing holds);
2. serve it through the real `Gateway.serve_ads` (tokens, pacing holds, served-feature log);
3. impressions for every slot; a click where the slot's uniform is below the TRUE pCTR at that
   slot; a conversion where the second uniform is below the true pCVR (common random numbers);
4. post them through `Gateway.accept_event` (token verification, de-duplication, the event log)
   and drain the event worker (Qscore counters, frequency caps, spend with the overspend guard,
   behaviour sequences); then refresh the Qscore and pacing snapshots as their background loops
   would between two requests of the simulated day.

The request's budget is generous (`ReplayConfig.budget_ms`): the replay measures decisions, not
latency, so a busy machine must not turn a stage into its fallback. Degraded answers are counted.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.data.truth import Truth
from models.pricing import click_value, ecpm
from services.common import wire
from services.common.config import Settings
from services.common.store import UserContext, utc_day
from services.common.store_load import load_marketplace
from services.common.store_memory import MemoryStore
from services.gateway.cascade import GatewayConfig
from services.gateway.clients import LocalStage
from services.gateway.funnel import top_per_campaign
from services.gateway.pacing import Pacer
from services.gateway.screening import ScreenPolicy, catalog_click_value, screen
from services.gateway.service import Gateway, Stages
from services.replay.arms import (
    UNBOUNDED,
    ChunkedRank,
    CorpusRecall,
    DqmRank,
    PassThroughPrerank,
    QscoreRank,
    Recorder,
    StageTrace,
    TruthRank,
)
from services.replay.traffic import ReplayRequest, Traffic, midnight_today

FUNNEL_STAGES = ("retrieval", "screen", "prerank", "auction")


@dataclass(frozen=True)
class ReplayConfig:
    """The replay's knobs (the CLI fills them)."""

    top_n: int = 10  # the funnel's top N (the auction stage uses the request's slot count)
    funnel_requests: int = 100  # requests sampled for the arms' own funnel (a corpus-wide DIN)
    # the full-ranker arm scores the whole corpus with DIN+ESMM per request (seconds each at
    # 100k ads on a CPU): it may replay only the first N requests (0 = all); comparisons with
    # it are then paired over that common prefix
    full_ranker_requests: int = 0
    budget_ms: float = 10_000.0
    gateway: GatewayConfig = field(default_factory=GatewayConfig)


@dataclass
class Shared:
    """What every arm reuses: the truth, the bundle's stage states and priors (read-only)."""

    data_dir: Path
    truth: Truth
    states: dict[str, Any]
    prior: Any
    counts: dict[int, tuple[int, int]]
    prior_cvr: float
    version: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)  # the K's it recommends, if any


class SimClock:
    """The simulated day laid over today's UTC date (see traffic.midnight_today)."""

    def __init__(self) -> None:
        self.midnight = midnight_today()
        self.sim_s = 0.0

    def __call__(self) -> float:
        return self.midnight + self.sim_s


class ReplayGateway(Gateway):
    """The gateway, without warm-up requests: they would run the corpus-wide arms eight times
    for nothing (the replay measures decisions, not first-request latency)."""

    async def warm_up(self, rounds: int = 8) -> None:
        return None


@dataclass
class ArmLog:
    """Per-request measurements of one arm (arrays over requests, for paired bootstraps)."""

    n: int
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    served_campaigns: set[int] = field(default_factory=set)
    spend_micros: int = 0  # today's spend of the campaigns it served, from its store
    budget_micros: int = 0  # their daily budgets
    campaigns_at_budget: int = 0
    funnel: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    vs_oracle: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("expected_revenue", "revenue", "impressions", "clicks", "conversions",
                     "advertiser_value", "allocated_value", "slots", "degraded"):
            self.columns[name] = np.zeros(self.n)

    def draw_outcomes(self, truth: Truth, traffic: Traffic, req: ReplayRequest,
                      hist: np.ndarray, ads: np.ndarray, positions: np.ndarray,
                      prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the simulated user does with the served slots (the truth, and the request's
        common random numbers, so every arm sees the same draws), recorded for request
        `req.index`; (clicked, converted) per slot."""
        col, r = self.columns, req.index
        pctr, pcvr = truth.request(int(req.user_id), hist, req.scene, positions, ads)
        ocpa, bid, tcpa = truth.bid_terms(ads)
        click = traffic.u_click[r, :ads.size] < pctr
        conversion = click & (traffic.u_conversion[r, :ads.size] < pcvr)
        col["expected_revenue"][r] = float((pctr * prices).sum())
        col["allocated_value"][r] = float(ecpm(pctr, click_value(ocpa, bid, tcpa, pcvr)).sum())
        col["impressions"][r] = ads.size
        col["clicks"][r] = int(click.sum())
        col["conversions"][r] = int(conversion.sum())
        col["advertiser_value"][r] = float(np.where(ocpa, conversion * tcpa, click * bid).sum())
        return click, conversion


def arm_stages(arm: str, shared: Shared, trace: StageTrace) -> tuple[Stages, GatewayConfig,
                                                                     list[Any]]:
    """The stage clients and K's of an arm, plus the states that need the arm's catalog."""
    s, base = shared.states, ReplayConfig().gateway
    late: list[Any] = []
    if arm == "cascade":
        states = {"retrieval": s["retrieval"], "prerank": s["prerank"], "rank": s["rank"]}
        config = base.for_bundle(shared.manifest)  # as `cascade serve` runs it
    else:
        corpus = CorpusRecall()
        late.append(corpus)
        states = {"retrieval": corpus, "prerank": PassThroughPrerank()}
        config = dataclasses.replace(base, k1=UNBOUNDED, k2=UNBOUNDED, k3=UNBOUNDED)
        if arm == "full-ranker":
            states["rank"] = ChunkedRank(s["rank"])
        elif arm == "oracle":
            states["rank"] = TruthRank(shared.truth)
        elif arm == "qscore-only":
            qscore = QscoreRank(prior_cvr=shared.prior_cvr)
            late.append(qscore)
            states["rank"] = qscore
            config = dataclasses.replace(config, k2=base.k2, k3=base.k3)
        elif arm == "dqm-only":
            states["prerank"] = s["prerank"]
            states["rank"] = DqmRank(s["prerank"], shared.prior_cvr)
            config = dataclasses.replace(config, k3=base.k3)
        else:
            raise ValueError(f"unknown arm {arm!r}")
    clients = {name: Recorder(LocalStage(name, state, threads=1), trace)
               for name, state in states.items()}
    stages = Stages(clients["retrieval"], clients["prerank"], clients["rank"],
                    prior=shared.prior, qscore_counts=shared.counts, prior_cvr=shared.prior_cvr)
    return stages, config, late


class ArmRun:
    """One arm's gateway over its own fresh store, driven request by request."""

    def __init__(self, arm: str, shared: Shared, cfg: ReplayConfig, traffic: Traffic,
                 progress: Callable[[str], None] | None = None) -> None:
        self.arm, self.shared, self.cfg, self.traffic = arm, shared, cfg, traffic
        self.progress = progress
        self.trace = StageTrace()
        self.clock = SimClock()
        self.log = ArmLog(len(traffic.requests))
        n = len(traffic.requests)
        step = max(1, n // max(1, cfg.funnel_requests))
        self.funnel_rows = set(range(0, n, step)[:cfg.funnel_requests])

    async def setup(self) -> None:
        stages, config, late = arm_stages(self.arm, self.shared, self.trace)
        settings = Settings(auth=False, token_secret=f"cascade-replay-secret-{self.traffic.seed}",
                            budget_ms=self.cfg.budget_ms)
        store = MemoryStore()
        await load_marketplace(store, self.shared.data_dir)
        self.gateway = ReplayGateway(settings, config, stages, store=store)
        gw = self.gateway
        gw.pacer = Pacer(gw.store, catalog=gw.catalog, clock=self.clock)
        gw.cascade.pacer = gw.pacer
        for state in late:
            state.catalog = gw.catalog
        await gw.start(background=False)

    async def run(self) -> ArmLog:
        started = time.perf_counter()
        await self.setup()
        try:
            for req in self.traffic.requests:
                await self.step(req)
                if self.progress:
                    self.progress(self.arm)
            await self._budgets()
        finally:
            await self.gateway.flush()
            await self.gateway.stop()
        self.log.seconds = time.perf_counter() - started
        return self.log

    async def _budgets(self) -> None:
        """Delivery: the day's spend of every campaign the arm served, against its budget."""
        ids = sorted(self.log.served_campaigns)
        if not ids:
            return
        store = self.gateway.store
        spend = await store.get_spend(ids, utc_day(self.clock()))
        campaigns = await store.get_campaigns(ids)
        budgets = {c: campaigns[c].daily_budget_micros for c in ids if c in campaigns}
        self.log.spend_micros = int(sum(spend.get(c, 0) for c in budgets))
        self.log.budget_micros = int(sum(budgets.values()))
        self.log.campaigns_at_budget = sum(spend.get(c, 0) >= b for c, b in budgets.items())

    async def step(self, req: ReplayRequest) -> None:
        gw, col = self.gateway, self.log.columns
        self.clock.sim_s = req.sim_s
        user = await gw.store.get_user_context(req.user_id)
        hist = np.asarray(user.hist_ad_id, np.int64)
        # arms that screen the whole corpus with K2 unbounded screen exactly the eligible set
        # themselves (the same call, seed and pacing state): read it off their trace instead
        eligible = None if self._screens_all else self._eligible(req, user.caps)
        self.trace.reset()
        response = await gw.serve_ads(wire.AdsRequest(
            request_id=req.request_id, user_id=req.user_id, scene=req.scene, slots=req.slots,
            context=wire.AdsContext(device=req.device, hour=req.hour),
            budget_ms=self.cfg.budget_ms))
        slots = list(response.slots)
        r = req.index
        col["slots"][r] = req.slots
        col["degraded"][r] = float(bool(response.degraded))
        ads = np.asarray([s.ad_id for s in slots], np.int64)
        if ads.size:
            await self._outcomes(req, slots, ads, hist)
        if eligible is None:
            eligible = self.trace.screened
        self._funnel(req, eligible, user, ads)

    @property
    def _screens_all(self) -> bool:
        return self.arm in ("full-ranker", "oracle", "dqm-only")

    def _eligible(self, req: ReplayRequest, caps: dict[int, int]) -> np.ndarray:
        """Every ad the cascade could serve this request: servable in the scene and through
        pacing and frequency caps, with screening's own seed (the same draws). In Qscore-eCPM
        order, so the qscore-only arm's own ranking is its order."""
        gw = self.gateway
        catalog = gw.catalog
        corpus = catalog.view.ads.ad_id[catalog.servable(req.scene)]
        return screen(corpus, scene=req.scene, caps=caps, catalog=catalog, pacer=gw.pacer,
                      policy=ScreenPolicy(UNBOUNDED, gw.config.freq_cap, gw.cascade.prior_cvr),
                      seed=zlib.crc32(req.request_id.encode())).ad_ids

    async def _outcomes(self, req: ReplayRequest, slots: list[wire.AdSlot], ads: np.ndarray,
                        hist: np.ndarray) -> None:
        gw, col, r = self.gateway, self.log.columns, req.index
        positions = np.asarray([s.position for s in slots], np.int64)
        prices = np.asarray([s.price_micros for s in slots], np.float64)
        click, conversion = self.log.draw_outcomes(self.shared.truth, self.traffic, req, hist,
                                                   ads, positions, prices)
        charged_before = gw.worker.stats.charged_micros
        for i, slot in enumerate(slots):
            kinds = ["impression"] + ["click"] * bool(click[i]) \
                + ["conversion"] * bool(conversion[i])
            for kind in kinds:
                await gw.accept_event(wire.EventRequest(
                    event_id=f"{req.request_id}:{slot.position}:{kind}", token=slot.token,
                    type=kind))
        while await gw.worker.process_batch():
            pass
        charged = gw.worker.stats.charged_micros - charged_before
        col["revenue"][r] = charged
        self.log.served_campaigns.update(s.campaign_id for s in slots)
        await gw.qscores.refresh(gw.store, gw.catalog)
        await gw.pacer.refresh()

    # -- funnel ------------------------------------------------------------------------------
    def _funnel(self, req: ReplayRequest, ids: np.ndarray, user: UserContext,
                winners: np.ndarray) -> None:
        """Shares of the oracle's top N (every request) and of the arm's own top N (sampled
        requests) still present after each stage of this request."""
        if ids.size == 0:
            return
        catalog, truth = self.gateway.catalog, self.shared.truth
        ranked = self.trace.ranked
        if self.arm == "oracle" and ranked is not None and ranked.ad_ids.size == ids.size:
            ids, pctr, pcvr = ranked.ad_ids, ranked.pctr, ranked.pcvr  # the truth, already
        else:
            pctr, pcvr = truth.request(int(req.user_id), user.hist_ad_id, req.scene, 0, ids)
        ocpa, bid, tcpa = truth.bid_terms(ids)
        true_ecpm = ecpm(pctr, click_value(ocpa, bid, tcpa, pcvr))
        self._shares(self.log.vs_oracle, catalog, ids, true_ecpm, req.slots, winners)
        if req.index in self.funnel_rows:
            own = true_ecpm if self.arm == "oracle" else self._own_ecpm(req, ids, user)
            self._shares(self.log.funnel, catalog, ids, own, req.slots, winners)

    def _shares(self, into: dict[str, list[float]], catalog: Any, ids: np.ndarray,
                scores: np.ndarray, slots: int, winners: np.ndarray) -> None:
        top = ids[top_per_campaign(catalog, ids, scores, self.cfg.top_n)]
        kept = {"retrieval": self.trace.recalled, "screen": self.trace.screened,
                "prerank": self.trace.preranked}
        for stage, survivors in kept.items():
            into[stage].append(float(np.isin(top, survivors).mean()))
        best = ids[top_per_campaign(catalog, ids, scores, slots)]
        into["auction"].append(float(np.isin(best, winners).mean()))

    def _own_ecpm(self, req: ReplayRequest, ids: np.ndarray, user: UserContext) -> np.ndarray:
        """The arm's final scorer over the eligible corpus, priced as its auction prices."""
        view = self.gateway.catalog.view
        if self.arm == "qscore-only":  # screening's order is the Qscore eCPM order
            return -np.arange(ids.size, dtype=np.float64)
        # the stage request exactly as the cascade builds it (Cascade._features_done)
        request = wire.RankRequest(
            request_id=req.request_id, user_id=req.user_id, scene=req.scene,
            hist=_hist_columns(user), user={k: v for k, v in (user.profile or {}).items()
                                            if k != "user_id"},
            context={"hour": req.hour, "position": 0, "device": req.device}, ad_ids=ids)
        if self.arm == "dqm-only":
            scored = DqmRank(self.shared.states["prerank"], self.shared.prior_cvr).handle(request)
        elif self.arm == "full-ranker" and self.trace.ranked is not None \
                and self.trace.ranked.ad_ids.size == ids.size:
            scored = self.trace.ranked  # its ranker already scored exactly this corpus
        else:
            scored = ChunkedRank(self.shared.states["rank"]).handle(request)
        order = np.argsort(scored.ad_ids)
        where = order[np.searchsorted(scored.ad_ids, ids, sorter=order)]
        rows = self.gateway.catalog.rows_of(ids)
        return ecpm(scored.pctr[where], catalog_click_value(view, rows, scored.pcvr[where]))


def _hist_columns(user: UserContext) -> dict[str, wire.Column]:
    """The behaviour columns of a stage request; none for an empty sequence (as served)."""
    if not user.hist_ad_id:
        return {}
    return {"hist_ad_id": wire.Column(ints=np.asarray(user.hist_ad_id, np.int64)),
            "hist_category_id": wire.Column(ints=np.asarray(user.hist_category_id, np.int64))}
