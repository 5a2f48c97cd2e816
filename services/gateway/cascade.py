"""The cascade: six named steps within one request deadline, each with its K, budget and fallback.

Read `STEPS` first: it is the whole request path in order, in one place (product-mixer style).

    features  store: profile + behaviour sequence + frequency caps, one round trip
    recall    retrieval stage: top K1 (faiss) or its cold-start channel
    screen    local: eligibility + top K2 by the Qscore eCPM estimate (screening.py)
    prerank   DQM stage: top K3
    rank      DIN/ESMM stage: pCTR, pCVR for the K3 candidates
    auction   local: eCPM, per-scene reserve, GSP per click, one ad per campaign (auction.py)

Deadlines: the request's absolute deadline is fixed when its first byte arrives (stamped by the
server protocol, services/common/admission.py), so time queued before the handler runs counts
against the budget. A step may use whatever is left,
minus what the later steps are guaranteed (`reserve_share` x the request budget, summed over the
later steps, shrunk in proportion when queueing left less than the budget); so a hung
retrieval cannot starve ranking of its share. A remote step that fails or
misses its deadline is skipped and the order of the step before stands (DIN -> DQM -> Qscore); the
response marks it `degraded` with the reason. Nothing in a stage failure becomes a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from models.bundle import read_bundle
from models.pricing import PRIOR_CVR, ecpm
from services.common import wire
from services.common.admission import AdmissionConfig
from services.common.deadline import Deadline, DeadlineExceeded
from services.common.store import OnlineStore, UserContext
from services.gateway.auction import Bids, Reserve, Winner, auction
from services.gateway.catalog import Catalog
from services.gateway.clients import StageClient
from services.gateway.pacing import Pacer
from services.gateway.screening import (
    QscoreTable,
    Screened,
    ScreenPolicy,
    catalog_click_value,
    screen,
)
from services.gateway.tokens import TokenSigner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One step of the request path: its cut (K), its guaranteed budget share, whether it
    calls a stage (and so runs under its own deadline), and what stands in when it fails."""

    name: str
    k: int | None
    reserve_share: float  # share of the request budget kept for this step by earlier steps
    remote: bool  # awaits the store or a stage: runs under its own deadline, can time out
    fallback: str


STEPS: tuple[Step, ...] = (
    Step("features", None, 0.10, True, "cold-start path (no profile, empty sequence)"),
    Step("recall", 2000, 0.20, True, "local cold-start pool: the scene's top 2 x K1 by Qscore"),
    Step("screen", 2000, 0.05, False, "none: an unscreened ad is never served (no slots)"),
    Step("prerank", 200, 0.20, True, "Qscore order, top K3"),
    Step("rank", None, 0.30, True, "DQM order (else Qscore); pCTR = Qscore, pCVR = prior"),
    Step("auction", None, 0.05, False, "none: no slots"),
)
STEP = {s.name: s for s in STEPS}
DEBUG_TOP = 20
TARGET_SHARE = 0.8  # of the default budget: the latency that shrinks the in-flight bound
QUEUE_SHARE = 0.6  # of the default budget: the longest wait for a handler before a 503
# How long a scene's local cold-start pool is reused. Its ranking (Qscore eCPM estimates)
# drifts over hours and screening drops whatever stopped being servable, so minutes are safe;
# at 30 s, recomputing the three scenes' pools over 1M ads (each a catalog-wide scan, refreshed
# whenever retrieval failed) took about 3% of a loaded worker's busy CPU (py-spy, 60 rps).
FALLBACK_TTL_S = 300.0


@dataclass(frozen=True)
class FallbackPool:
    """A scene's local cold-start pool and the catalog version and time it was made at."""

    version: int
    at: float  # time.monotonic()
    ids: np.ndarray


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

    k1: int = STEP["recall"].k or 0
    k2: int = STEP["screen"].k or 0
    k3: int = STEP["prerank"].k or 0
    freq_cap: int = 5  # impressions per campaign per user per UTC day
    prior_cvr: float = PRIOR_CVR  # used when the bundle records none
    rank_fallback_factor: int = 4  # with rank degraded, the top factor x slots enter the auction
    scenes: dict[str, SceneRules] = field(default_factory=lambda: dict(DEFAULT_SCENES))
    catalog_refresh_s: float = 1.0
    qscore_refresh_s: float = 5.0
    dedupe_window_s: float = 86_400.0
    max_body_bytes: int = 1024 * 1024
    # overload shedding per worker (services.common.admission): answers slower than
    # latency_target_ms shrink the in-flight bound; a request queued longer than
    # max_queue_ms before its handler starts is answered 503 at once. None: a share of the
    # default request budget (`admission`)
    latency_target_ms: float | None = None
    max_queue_ms: float | None = None
    # shares of K1 per recall channel (services.retrieval.recall.ChannelQuotas); None: the
    # retrieval stage's defaults
    recall_quotas: dict[str, float] | None = None
    # the K's set explicitly (settings file); the others follow the bundle's recommendation
    ks_explicit: frozenset[str] = frozenset()
    # the K's that came from a bundle's recommendation (`for_bundle`): a reload re-resolves them
    ks_from_bundle: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatewayConfig:
        data = dict(data)
        data["ks_explicit"] = frozenset(k for k in KS if k in data)
        if "scenes" in data:
            data["scenes"] = {
                name: SceneRules(int(rule.get("max_slots", 8)),
                                 Reserve(float(rule.get("reserve_ecpm_micros", 0.0)),
                                         int(rule.get("reserve_cpc_micros", 0))))
                for name, rule in data["scenes"].items()}
        return cls(**data)

    def admission(self, budget_ms: float) -> AdmissionConfig:
        """The shedding knobs for a default request budget: unless set, answers may take 0.8
        of it and a request may wait 0.6 of it for its handler (20 and 15 ms at 25 ms, where
        the overload benchmark tuned them). Fixed values would shed requests the worker can
        still answer in time on a slower machine or with a larger budget: a box where an
        unloaded answer takes 20 ms shed 7-10% of 50 rps at about 40% CPU with a 20 ms
        target, and 0.1-0.2% with the derived one."""
        target = self.latency_target_ms
        wait = self.max_queue_ms
        return AdmissionConfig(
            target_ms=float(target) if target is not None else TARGET_SHARE * budget_ms,
            max_wait_ms=float(wait) if wait is not None else QUEUE_SHARE * budget_ms)

    def for_bundle(self, manifest: dict[str, Any] | None) -> GatewayConfig:
        """The K's this gateway runs with a bundle: an explicit setting (or a K changed from
        its default in code) wins; otherwise the bundle's recommendation
        (manifest["recommended_ks"], measured by scripts/choose_ks.py); otherwise the default.
        K's taken from an earlier bundle are re-resolved, so a reload follows the new bundle.
        """
        recommended = (manifest or {}).get("recommended_ks") or {}
        changes: dict[str, Any] = {}
        for name in KS:
            explicit = name in self.ks_explicit or (
                name not in self.ks_from_bundle and getattr(self, name) != DEFAULT_KS[name])
            if explicit:
                continue
            value = recommended.get(name)
            changes[name] = value if isinstance(value, int) and value > 0 else DEFAULT_KS[name]
        changes["ks_from_bundle"] = frozenset(n for n in KS if n in changes
                                              and changes[n] != DEFAULT_KS[n])
        return replace(self, **changes)

    @classmethod
    def for_bundle_path(cls, settings_gateway: dict[str, Any], bundle: str | None
                        ) -> GatewayConfig:
        """`from_dict` of the settings' gateway section, then the bundle's K's (if any)."""
        config = cls.from_dict(settings_gateway)
        return config.for_bundle_at(bundle) if bundle else config

    def for_bundle_at(self, bundle: str) -> GatewayConfig:
        """`for_bundle` with the manifest of the bundle at `bundle` (a version dir or root)."""
        return self.for_bundle(read_bundle(bundle, verify=False).manifest)


KS = ("k1", "k2", "k3")
DEFAULT_KS = {"k1": STEP["recall"].k or 0, "k2": STEP["screen"].k or 0,
              "k3": STEP["prerank"].k or 0}


@dataclass
class StageRecord:
    """What one step did (becomes a `StageReport`, plus debug candidates)."""

    name: str
    count_in: int = 0
    count_out: int = 0
    ms: float = 0.0
    degraded: bool = False
    reason: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    top: tuple[np.ndarray, np.ndarray] | None = None  # (ad ids, scores), best first
    channels: list[str] | None = None  # recall: each candidate's channel, aligned with top

    def report(self) -> wire.StageReport:
        return wire.StageReport.model_construct(
            name=self.name, count_in=self.count_in, count_out=self.count_out,
            ms=round(self.ms, 3), degraded=self.degraded, reason=self.reason,
            dropped=self.dropped)

    def debug(self) -> wire.DebugStage:
        ids, scores = self.top if self.top is not None else ((), ())
        if self.channels is not None and len(self.channels) == len(ids):
            return self._debug_channels(np.asarray(ids), np.asarray(scores))
        return wire.DebugStage(name=self.name, candidates=[
            wire.DebugCandidate(ad_id=int(a), score=float(v))
            for a, v in zip(list(ids)[:DEBUG_TOP], list(scores)[:DEBUG_TOP], strict=True)])

    def _debug_channels(self, ids: np.ndarray, scores: np.ndarray) -> wire.DebugStage:
        """Recall: the first DEBUG_TOP candidates of every channel, each labelled."""
        names = np.asarray(self.channels, dtype=object)
        picked = np.concatenate([np.flatnonzero(names == c)[:DEBUG_TOP]
                                 for c in dict.fromkeys(self.channels)] or [np.empty(0, int)])
        picked.sort()
        return wire.DebugStage(name=self.name, candidates=[
            wire.DebugCandidate(ad_id=int(ids[i]), score=float(scores[i]), channel=names[i])
            for i in picked.tolist()])


@dataclass
class RequestState:
    """Everything one request's steps pass along: the candidates in their current order and
    the scores the next step needs. Each step reads and replaces what it owns."""

    request: wire.AdsRequest
    deadline: Deadline
    budget_ms: float
    now: float
    hour: int
    records: dict[str, StageRecord]
    preset_user: UserContext | None = None
    user: UserContext = field(default_factory=lambda: UserContext(profile=None))
    part: dict[str, Any] = field(default_factory=dict)  # the user half of every stage request
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    screened: Screened = field(default_factory=Screened.empty)
    pctr: np.ndarray = field(default_factory=lambda: np.empty(0))
    pcvr: np.ndarray = field(default_factory=lambda: np.empty(0))
    model_version: str = ""
    winners: list[Winner] = field(default_factory=list)

    def count_out(self, step: str) -> int:
        """What a step hands on: a known user, the candidates, or the filled slots."""
        if step == "features":
            return int(self.user.known)
        return len(self.winners) if step == "auction" else int(self.ids.size)


@dataclass
class CascadeResult:
    """The response plus what side effects need (served-feature log, pacing holds)."""

    response: wire.AdsResponse
    winners: list[Winner]
    user: UserContext
    stage_context: dict[str, Any]


class Cascade:
    """Runs the six steps of `STEPS` for one `AdsRequest` with the given stage clients.

    `run` is one loop over `STEPS`: each step is the method `_<name>` (plus `_<name>_fallback`
    where the step has one); a remote step runs under its share of the deadline and a failed
    or late one leaves the previous order standing.
    """

    def __init__(self, *, config: GatewayConfig, store: OnlineStore, catalog: Catalog,
                 qscores: QscoreTable, pacer: Pacer | None, signer: TokenSigner,
                 retrieval: StageClient, prerank: StageClient, rank: StageClient,
                 prior_cvr: float | None = None, budget_ms: float = 50.0,
                 model_version: Callable[[], str] = lambda: "") -> None:
        self.config = config
        self.store, self.catalog, self.qscores = store, catalog, qscores
        self.pacer, self.signer = pacer, signer
        self.retrieval, self.prerank, self.rank = retrieval, prerank, rank
        self.prior_cvr = prior_cvr if prior_cvr is not None else config.prior_cvr
        self.model_version = model_version
        self.budget_ms = budget_ms  # default request budget (CASCADE_BUDGET_MS)
        self._fallback: dict[str, FallbackPool] = {}
        self._fallback_refresh: dict[str, asyncio.Task[np.ndarray]] = {}
        self._steps = [(step, getattr(self, f"_{step.name}"),
                        getattr(self, f"_{step.name}_fallback", None)) for step in STEPS]
        self._later_share = {step.name: sum(s.reserve_share for s in STEPS[i + 1:])
                             for i, step in enumerate(STEPS)}
        self._own_share = {step.name: step.reserve_share for step in STEPS}

    # -- the request path ------------------------------------------------------------------------
    async def run(self, request: wire.AdsRequest, arrived: float | None = None,
                  user: UserContext | None = None) -> CascadeResult:
        """Serve one request. `arrived` (time.monotonic() when its first byte came in) starts
        the deadline, so time spent queued before the handler ran counts against the budget.
        `user` stands in for the store's read (warm-up requests)."""
        budget_ms = request.budget_ms or self.budget_ms
        start = time.monotonic() if arrived is None else arrived
        now = time.time()
        hour = request.context.hour if request.context.hour is not None else \
            datetime.fromtimestamp(now, tz=UTC).hour
        st = RequestState(request, Deadline(start + budget_ms / 1000.0), budget_ms, now, hour,
                          {s.name: StageRecord(s.name) for s in STEPS}, preset_user=user)
        for step, call, fallback in self._steps:
            record = st.records[step.name]
            record.count_in = int(st.ids.size)
            started = time.perf_counter()
            if step.remote:
                deadline = st.deadline.child(self._step_budget_ms(step.name, st))
                ok = await self._guarded(record, deadline, lambda d, c=call: c(st, d))
            else:
                ok = self._local(record, lambda c=call: c(st))
            if not ok and fallback is not None:
                await fallback(st)
            record.ms = (time.perf_counter() - started) * 1000
            record.count_out = st.count_out(step.name)
        return self._result(st)

    def _step_budget_ms(self, name: str, st: RequestState) -> float:
        """What a step may use: what is left, minus what the later steps are guaranteed.

        The guarantee is their shares of the request budget, but never more than their
        proportional part of what is left: a request that queued before its handler ran has
        less than its budget, and the loss is spread over the steps instead of taking the
        first step's whole share (which would skip the store read and serve a cold user)."""
        left = st.deadline.remaining_ms()
        later = self._later_share[name]
        keep = min(later * st.budget_ms, left * later / (later + self._own_share[name]))
        return max(0.0, left - keep)

    async def _guarded(self, record: StageRecord, deadline: Deadline,
                       call: Callable[[Deadline], Awaitable[Any]]) -> bool:
        """Run a remote step within its deadline; False (and the record degraded) on failure."""
        try:
            if deadline.remaining_ms() <= 0:
                raise DeadlineExceeded("no budget left")
            async with asyncio.timeout(deadline.remaining_s()):  # no extra task per call
                await call(deadline)
            return True
        except (TimeoutError, DeadlineExceeded) as exc:
            record.degraded, record.reason = True, f"deadline exceeded: {exc}".rstrip(": ")
        except Exception as exc:  # noqa: BLE001 - a stage failure is a degraded answer
            record.degraded = True
            record.reason = f"failed: {type(exc).__name__}: {exc}"[:300]
            log.warning("stage %s failed: %s", record.name, record.reason)
        return False

    @staticmethod
    def _local(record: StageRecord, call: Callable[[], None]) -> bool:
        """Run a local (inline, sub-millisecond) step; a bug degrades, never a 5xx."""
        try:
            call()
            return True
        except Exception as exc:  # noqa: BLE001 - never serve from a broken local step
            log.exception("step %s failed", record.name)
            record.degraded = True
            record.reason = f"failed: {type(exc).__name__}: {exc}"[:300]
        return False

    # Stage requests are built with `model_construct`: their fields come from validated input
    # and the catalog, so validating them again per call would only cost time.

    # -- 1 features --------------------------------------------------------------------------
    async def _features(self, st: RequestState, deadline: Deadline) -> None:
        st.user = st.preset_user or await self.store.get_user_context(st.request.user_id)
        self._features_done(st)

    async def _features_fallback(self, st: RequestState) -> None:
        st.user = UserContext(profile=None)
        self._features_done(st)

    def _features_done(self, st: RequestState) -> None:
        request = st.request
        context: dict[str, wire.ScalarValue] = {"hour": st.hour, "position": 0}
        if request.context.device:
            context["device"] = request.context.device
        st.part = dict(request_id=request.request_id, user_id=request.user_id,
                       scene=request.scene, context=context, hist=self._hist(st.user),
                       user={k: v for k, v in (st.user.profile or {}).items() if k != "user_id"},
                       model_version=self.model_version())  # one bundle for every stage

    # -- 2 recall ------------------------------------------------------------------------------
    async def _recall(self, st: RequestState, deadline: Deadline) -> None:
        recalled = await self.retrieval.call(
            wire.RecallRequest.model_construct(**st.part, k=self.config.k1,
                                               quotas=self.config.recall_quotas), deadline)
        st.ids, st.scores = recalled.ad_ids, recalled.scores
        record = st.records["recall"]
        record.top = (st.ids, st.scores)
        if st.request.debug:
            record.channels = recalled.candidate_channels()

    async def _recall_fallback(self, st: RequestState) -> None:
        """The scene's best ads by Qscore eCPM (cached, bounded: see `_fallback_pool`)."""
        st.ids = await self._fallback_pool(st.request.scene)
        st.scores = np.zeros(st.ids.size)

    async def _fallback_pool(self, scene: str) -> np.ndarray:
        """The scene's top 2 x K1 servable ads by the Qscore eCPM estimate.

        Bounded on purpose: screening the whole catalog when retrieval fails would cost a
        million-ad scan per request exactly when the gateway is overloaded. For the same
        reason the scan is never paid per request: one computation per scene at a time
        (single flight, off the event loop), and once a pool exists a stale one (catalog
        changed, or older than `FALLBACK_TTL_S`) is served while its refresh runs. A stale pool
        is safe: screening drops whatever stopped being servable since. Measured before this:
        under load every request whose retrieval timed out recomputed the pool (17% of a
        worker's CPU at 1M ads), which made more requests time out.
        """
        pool = self._fallback.get(scene)
        if pool is not None and pool.version == self.catalog.version \
                and time.monotonic() - pool.at < FALLBACK_TTL_S:
            return pool.ids
        task = self._fallback_refresh.get(scene)
        if task is None:
            task = asyncio.create_task(self._refresh_fallback(scene))
            self._fallback_refresh[scene] = task
            task.add_done_callback(lambda _, s=scene: self._fallback_refresh.pop(s, None))
        if pool is not None:
            return pool.ids
        # the first pool of a scene (normally made by `prepare_fallbacks` at start): wait for
        # it, shielded so a request that gives up does not cancel it for the others
        return await asyncio.shield(task)

    async def _refresh_fallback(self, scene: str) -> np.ndarray:
        version, at = self.catalog.version, time.monotonic()
        ids = await asyncio.to_thread(self._compute_fallback, scene)
        self._fallback[scene] = FallbackPool(version, at, ids)
        return ids

    async def prepare_fallbacks(self) -> None:
        """Compute every scene's fallback pool now (start-up), so no request waits for one."""
        await asyncio.gather(*(self._fallback_pool(scene) for scene in self.config.scenes))

    def _compute_fallback(self, scene: str) -> np.ndarray:
        view = self.catalog.view
        rows = self.catalog.servable(scene)
        k = min(rows.size, 2 * self.config.k1)
        if rows.size > k:
            estimate = ecpm(view.ads.qctr[rows], catalog_click_value(view, rows, self.prior_cvr))
            rows = rows[np.argpartition(-estimate, k - 1)[:k]]
        return view.ads.ad_id[rows]

    # -- 3 screen ------------------------------------------------------------------------------
    def _screen(self, st: RequestState) -> None:
        request = st.request
        st.screened = screen(st.ids, scene=request.scene, caps=st.user.caps,
                             catalog=self.catalog, pacer=self.pacer,
                             policy=ScreenPolicy(self.config.k2, self.config.freq_cap,
                                                 self.prior_cvr),
                             seed=zlib.crc32(request.request_id.encode()))
        st.ids, st.scores = st.screened.ad_ids, st.screened.estimate
        record = st.records["screen"]
        record.dropped, record.top = st.screened.dropped, (st.ids, st.scores)

    async def _screen_fallback(self, st: RequestState) -> None:
        st.screened = Screened.empty()
        st.ids, st.scores = st.screened.ad_ids, st.screened.estimate

    # -- 4 prerank -----------------------------------------------------------------------------
    async def _prerank(self, st: RequestState, deadline: Deadline) -> None:
        screened, k3 = st.screened, self.config.k3
        if screened.ad_ids.size:
            pre = await self.prerank.call(wire.PrerankRequest.model_construct(
                **st.part, k=k3, ad_ids=screened.ad_ids,
                values=screened.click_value.astype(np.float32)), deadline)
            st.ids, st.scores = pre.ad_ids[:k3], pre.scores[:k3]
        st.records["prerank"].top = (st.ids, st.scores)

    async def _prerank_fallback(self, st: RequestState) -> None:
        st.ids, st.scores = st.ids[:self.config.k3], st.scores[:self.config.k3]

    # -- 5 rank --------------------------------------------------------------------------------
    async def _rank(self, st: RequestState, deadline: Deadline) -> None:
        if not st.ids.size:
            st.pctr = st.pcvr = np.empty(0)
            return
        ranked = await self.rank.call(
            wire.RankRequest.model_construct(**st.part, ad_ids=st.ids), deadline)
        st.ids, st.pctr, st.pcvr = ranked.ad_ids, ranked.pctr, ranked.pcvr
        st.model_version = ranked.info.model_version
        st.records["rank"].top = (st.ids, st.pctr)

    async def _rank_fallback(self, st: RequestState) -> None:
        """The previous order's head, priced with the Qscore CTR and the prior CVR."""
        slots = st.request.slots
        st.ids = st.ids[:max(self.config.rank_fallback_factor * slots, slots)]
        rows = self.catalog.rows_of(st.ids)
        st.pctr = np.where(rows >= 0, self.catalog.view.ads.qctr[np.maximum(rows, 0)],
                           self.qscores.prior.prior_mean)
        st.pcvr = np.full(st.ids.size, self.prior_cvr)
        st.records["rank"].top = (st.ids, st.pctr)

    # -- 6 auction -----------------------------------------------------------------------------
    def _auction(self, st: RequestState) -> None:
        view = self.catalog.view
        rows = view.ad_index.rows(st.ids)
        known = rows >= 0
        rec = view.ads.take(rows[known])
        bids = Bids(rec["ad_id"], rec["campaign_id"], rec["ocpa"], rec["bid_micros"],
                    rec["target_cpa_micros"], np.asarray(st.pctr, np.float64)[known],
                    np.asarray(st.pcvr, np.float64)[known])
        st.winners = auction(bids, st.request.slots,
                             self.config.scenes[st.request.scene].reserve)
        st.records["auction"].top = (np.array([w.ad_id for w in st.winners], np.int64),
                                     np.array([w.ecpm for w in st.winners]))

    # -- the answer ----------------------------------------------------------------------------
    def _result(self, st: RequestState) -> CascadeResult:
        request, records = st.request, st.records.values()
        response = wire.AdsResponse.model_construct(
            request_id=request.request_id,
            slots=[self._slot(w, request, st.now) for w in st.winners],
            stages=[r.report() for r in records],
            degraded=any(r.degraded for r in records),
            model_version=st.model_version or self.model_version(),
            debug=[r.debug() for r in records] if request.debug else [])
        return CascadeResult(response, st.winners, st.user,
                             {"hour": st.hour, "ts": st.now, **st.part})

    @staticmethod
    def _hist(user: UserContext) -> dict[str, wire.Column]:
        """The behaviour columns; none at all for an empty sequence, so a user with nothing
        to go on takes retrieval's cold-start channel instead of a featureless user vector."""
        if not user.hist_ad_id:
            return {}
        return {"hist_ad_id": wire.Column(ints=np.asarray(user.hist_ad_id, np.int64)),
                "hist_category_id": wire.Column(ints=np.asarray(user.hist_category_id,
                                                                np.int64))}

    def _slot(self, winner: Winner, request: wire.AdsRequest, now: float) -> wire.AdSlot:
        view = self.catalog.view
        row = view.ad_index.get(winner.ad_id)
        a = view.ads
        creative = str(a.creative_id[row]) if row is not None else ""
        category = int(a.category_id[row]) if row is not None else 0
        token = self.signer.sign(request_id=request.request_id, ad_id=winner.ad_id,
                                 campaign_id=winner.campaign_id, user_id=request.user_id,
                                 scene=request.scene, price_micros=winner.price_micros,
                                 category_id=category, position=winner.slot, now=now)
        return wire.AdSlot.model_construct(
            position=winner.slot, ad_id=winner.ad_id, campaign_id=winner.campaign_id,
            creative_id=creative, price_micros=winner.price_micros,
            pctr=winner.candidate.pctr, pcvr=winner.candidate.pcvr,
            ecpm=round(winner.ecpm, 3), token=token)
