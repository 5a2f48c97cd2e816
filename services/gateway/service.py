"""The gateway's components wired together: store, catalog, Qscore, pacing, events, cascade.

`Gateway` is what the FastAPI app (app.py, admin.py) talks to. It owns the background tasks that
keep the request path free of per-ad store reads: the catalog refresh (1 s), the pacing refresh
(1 s), the Qscore counter refresh (5 s), and the event worker (a consumer group on the Redis
Stream, or the in-process log with the same code, so several gateway processes share the work).

Side effects of serving (product-mixer's "side effects") run after the answer is computed: a
pacing hold for each slot's expected cost, and one served-feature record per slot.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from models.nn.qscore import Qscore
from services.common import wire
from services.common.admission import Admission
from services.common.config import Settings
from services.common.events import (
    Event,
    EventLogUnavailable,
    EventType,
    make_event_log,
    make_label_log,
)
from services.common.store import OnlineStore, UserContext, make_store
from services.common.telemetry import LATENCY_BUCKETS
from services.gateway.cascade import Cascade, GatewayConfig
from services.gateway.catalog import Catalog
from services.gateway.clients import StageClient
from services.gateway.pacing import Pacer
from services.gateway.screening import DEFAULT_PRIOR, QscoreTable
from services.gateway.served_log import SERVED_KEY, ServedSources, served_records
from services.gateway.tokens import TokenError, TokenSigner
from services.gateway.worker import EventWorker, now_ms

log = logging.getLogger(__name__)
SERVED_BATCH_S = 0.02  # served-feature records are written in batches this far apart


class EventRejected(ValueError):
    """An event that must not count (bad token, unknown ad); the message names the problem."""


@dataclass
class Stages:
    """The three stage clients (in-process or HTTP) and the bundle-derived priors."""

    retrieval: StageClient
    prerank: StageClient
    rank: StageClient
    prior: Qscore = DEFAULT_PRIOR
    qscore_counts: dict[int, tuple[int, int]] | None = None
    prior_cvr: float | None = None
    vectorizer: Any = None  # computes a new ad's two-tower vector (stage_loaders.AdVectorizer)

    def all(self) -> dict[str, StageClient]:
        return {"retrieval": self.retrieval, "prerank": self.prerank, "rank": self.rank}


class GatewayMetrics:
    """Prometheus series of the gateway (its own registry, see services.common.telemetry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request = Histogram("cascade_gateway_request_seconds", "POST /v1/ads latency",
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.stage = Histogram("cascade_gateway_stage_seconds", "Time spent per cascade step",
                               ("stage",), registry=self.registry, buckets=LATENCY_BUCKETS)
        self.degraded = Counter("cascade_gateway_degraded", "Requests with a degraded step",
                                ("stage",), registry=self.registry)
        self.responses = Counter("cascade_gateway_responses", "Responses by endpoint and status",
                                 ("endpoint", "status"), registry=self.registry)
        self.events = Counter("cascade_gateway_events", "Tracking events by outcome",
                              ("type", "outcome"), registry=self.registry)
        self.dropped = Counter("cascade_gateway_screen_dropped",
                               "Candidates screening removed, by rule", ("reason",),
                               registry=self.registry)

    def observe(self, response: wire.AdsResponse, seconds: float) -> None:
        self.request.observe(seconds)
        for stage in response.stages:
            self.stage.labels(stage.name).observe(stage.ms / 1000)
            if stage.degraded:
                self.degraded.labels(stage.name).inc()
            for reason, count in stage.dropped.items():
                self.dropped.labels(reason).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Gateway:
    """Everything behind /v1 and /admin (see the module docstring)."""

    def __init__(self, settings: Settings, config: GatewayConfig, stages: Stages, *,
                 store: OnlineStore | None = None) -> None:
        self.settings, self.config, self.stages = settings, config, stages
        self.store = store or make_store(settings)
        client = getattr(self.store, "client", None) if settings.redis_url else None
        self.events = make_event_log(settings, client)
        self.labels = make_label_log(settings, client)
        self.served = make_label_log(settings, client, SERVED_KEY)
        self.worker = EventWorker(self.events, self.store, self.labels)
        self.signer = TokenSigner.from_settings(settings)
        self.qscores = QscoreTable(stages.prior, stages.qscore_counts)
        self.catalog = Catalog(scenes=tuple(config.scenes), qscore=self.qscores.ctr)
        self.pacer = Pacer(self.store, catalog=self.catalog)
        self.metrics = GatewayMetrics()
        shed = config.admission(settings.budget_ms)
        self.admission = {"/v1/ads": Admission(shed), "/v1/events": Admission(shed)}
        self.cascade = Cascade(
            config=config, store=self.store, catalog=self.catalog, qscores=self.qscores,
            pacer=self.pacer, signer=self.signer, retrieval=stages.retrieval,
            prerank=stages.prerank, rank=stages.rank, prior_cvr=stages.prior_cvr,
            budget_ms=settings.budget_ms, model_version=self.model_version)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._side_effects: set[asyncio.Task[Any]] = set()
        self._served_queue: list[dict[str, Any]] = []
        self._served_writer: asyncio.Task[None] | None = None
        self.started = False
        self.pinned_version = ""  # set by a reload (admin.reload_all); empty: stages' current

    def model_version(self) -> str:
        """The bundle version requests are pinned to: what every stage serves, or during a
        reload the version before it (stages that switched still hold it)."""
        return self.pinned_version or str(getattr(self.stages.rank, "version", "") or "")

    def pin_version(self, version: str) -> None:
        self.pinned_version = version

    async def follow_bundle(self, path: str | None) -> None:
        """After a reload: run with the K's the new bundle recommends (`GatewayConfig.
        for_bundle`; explicit settings still win). An unreadable manifest keeps the K's."""
        if not path:
            return
        try:
            self.config = await asyncio.to_thread(self.config.for_bundle_at, path)
        except Exception:  # noqa: BLE001 - the stages already serve it; keep the K's we have
            log.exception("reloaded bundle %s: manifest unreadable, K's kept", path)
            return
        self.cascade.config = self.config

    def sources(self) -> ServedSources:
        return ServedSources(self.store, self.served, self.labels)

    # -- lifecycle -----------------------------------------------------------------------------
    async def preload(self) -> None:
        """Read the catalog and the Qscore counters before worker processes are forked
        (services.common.prefork), through a store client of its own that is closed again:
        the workers then start from these pages, shared, and only catch up on changes."""
        store = make_store(self.settings)
        try:
            await self._load_snapshot(store)
        finally:
            await store.close()

    async def _load_snapshot(self, store: OnlineStore) -> None:
        await self.catalog.load(store)
        view = self.catalog.view
        await self.qscores.refresh(store, self.catalog, view.ad_index.ids[:view.n_ads].tolist())

    async def start(self, background: bool = True) -> None:
        if self.catalog.version < 0:
            await self._load_snapshot(self.store)
        else:  # preloaded before the fork: catch up on what changed since
            await self.catalog.refresh(self.store)
            await self.qscores.refresh(self.store, self.catalog)
        await self.pacer.refresh()
        await self.warm_up()
        # the catalog, the bundle and everything else loaded so far stay for the process's
        # life: keep the collector from walking them on every full collection (~1 s at 1M ads)
        gc.collect()
        gc.freeze()
        if background:
            stop, cfg = self._stop, self.config
            self._tasks = [
                asyncio.create_task(self.catalog.run(self.store, stop, cfg.catalog_refresh_s)),
                asyncio.create_task(self.pacer.run(stop)),
                asyncio.create_task(self.qscores.run(self.store, self.catalog, stop,
                                                     cfg.qscore_refresh_s)),
                asyncio.create_task(self.worker.run_forever(stop)),
            ]
        self.started = True

    async def warm_up(self, rounds: int = 8) -> None:
        """Unlogged requests before readiness, down every path a real one takes: the first
        calls of each stage pay for thread pools, torch kernels, per-scene caches and the
        first touch of the index's pages after a fork, which would otherwise stall the first
        real requests. Half the rounds carry a behaviour history taken from the catalog (the
        faiss and attention paths), half none (the cold-start path). Every scene's fallback
        pool (retrieval's stand-in) is computed first, so no request waits for one. No side
        effects: no tokens are handed out, nothing is logged, no pacing hold is taken."""
        await self.cascade.prepare_fallbacks()
        view = self.catalog.view
        scenes = list(self.config.scenes)
        for i in range(rounds):
            rows = np.arange(i, view.n_ads, max(1, view.n_ads // 50))[:50]
            user = UserContext(profile={}, hist_ad_id=view.ads.ad_id[rows].tolist(),
                               hist_category_id=view.ads.category_id[rows].tolist()) \
                if i % 2 == 0 and rows.size else UserContext(profile=None)
            try:
                result = await self.cascade.run(wire.AdsRequest(
                    request_id=f"warm-up-{i}", user_id="__warm_up__",
                    scene=scenes[i % len(scenes)], slots=1, budget_ms=10_000), user=user)
            except Exception:  # noqa: BLE001 - warm-up is best effort
                log.exception("warm-up request failed")
                continue
            late = [s.name for s in result.response.stages
                    if s.degraded and "deadline" in s.reason]
            if late:  # a hung stage: each further round would wait out its budget again
                log.warning("warm-up stopped: %s did not answer within 10 s", ", ".join(late))
                return

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._side_effects, return_exceptions=True)
        for client in self.stages.all().values():
            await client.close()
        await self.store.close()

    async def ready(self) -> dict[str, bool]:
        out = {name: await client.ready() for name, client in self.stages.all().items()}
        out["catalog"] = self.started and len(self.catalog) > 0
        return out

    # -- the request path ----------------------------------------------------------------------
    async def serve_ads(self, request: wire.AdsRequest,
                        arrived: float | None = None) -> wire.AdsResponse:
        """Answer one ad request; `arrived` (monotonic) starts its deadline (see Cascade.run)."""
        started = time.perf_counter()
        result = await self.cascade.run(request, arrived)
        self.metrics.observe(result.response, time.perf_counter() - started)
        if result.winners:
            for winner in result.winners:  # hold the expected cost until the click can land
                self.pacer.note_served(winner.campaign_id,
                                       winner.price_micros * winner.candidate.pctr)
            self._served_queue.extend(served_records(result))
            if self._served_writer is None or self._served_writer.done():
                self._served_writer = asyncio.create_task(self._write_served())
                self._side_effects.add(self._served_writer)
                self._served_writer.add_done_callback(self._side_effects.discard)
        return result.response

    async def _write_served(self) -> None:
        """Append the served records of every request answered within `SERVED_BATCH_S` in
        one round trip (one write per request cost a Redis round trip each under load)."""
        await asyncio.sleep(SERVED_BATCH_S)
        while self._served_queue:
            batch, self._served_queue = self._served_queue, []
            try:
                await self.served.append_many(batch)
            except Exception:  # noqa: BLE001 - losing a log line must not fail serving
                log.exception("served-feature log append failed (%d records)", len(batch))

    async def flush(self) -> None:
        """Wait for pending side effects (tests, shutdown)."""
        if self._side_effects:
            await asyncio.gather(*list(self._side_effects), return_exceptions=True)

    # -- events --------------------------------------------------------------------------------
    async def accept_event(self, request: wire.EventRequest) -> wire.EventResponse:
        """Verify the token, then append once per event id; raises EventRejected, or
        EventLogUnavailable (nothing appended: the client retries the same event id)."""
        try:
            claims = self.signer.verify(request.token, time.time())
        except TokenError as exc:
            self.metrics.events.labels(request.type, "rejected").inc()
            raise EventRejected(str(exc)) from None
        if self.catalog.row(claims.ad_id) is None:
            self.metrics.events.labels(request.type, "rejected").inc()
            raise EventRejected(f"ad {claims.ad_id} was not served by this gateway")
        event = Event(request.event_id, EventType(request.type), claims, now_ms())
        try:
            entry = await self.events.append(event, self.config.dedupe_window_s)
        except EventLogUnavailable:
            self.metrics.events.labels(request.type, "unavailable").inc()
            raise
        self.metrics.events.labels(request.type, "duplicate" if entry is None else "ok").inc()
        return wire.EventResponse(event_id=request.event_id, accepted=entry is not None,
                                  duplicate=entry is None)
