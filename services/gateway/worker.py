"""The event worker: turns accepted tracking events into counters, caps, spend, behaviour, labels.

It consumes the event log through a consumer group, so several workers share the load and an
entry stays pending until a worker acks it. Each pass first reclaims entries that another
(crashed) consumer left pending for longer than `reclaim_idle_ms`, then reads new ones. When a
batch fails part-way (the store dropped a connection), the entries it had read but not acked are
handled again first on the next pass, a second later, rather than after `reclaim_idle_ms`: they
are this worker's own, and applying is exactly-once per slot, so a retry never double counts.

Per event (the token's claims say which slot it is about; its `ts_ms` says which UTC day):

- impression: Qscore `impressions + 1`; frequency cap `cap:{user}:{day}[campaign] + 1`.
- click: Qscore `clicks + 1`; spend `+ billable_micros(price)` (pacing's overspend guard);
  the user's behaviour sequence gets `(ad_id, category_id)`; a label record.
- conversion: a label record (billing is per click; conversions only teach the CVR model).

Label records go to the append-only `{prefix}labels` stream (or the in-process `RecordLog`):
`{event_id, type, request_id, ad_id, campaign_id, user_id, scene, position, ts_ms,
charged_micros}`. The gateway logs the served features under the same `(request_id, ad_id)`, and
training joins the two; an impression without a label record is a negative.

Delivery semantics: the log de-duplicates event ids at append. The worker then applies each (type,
request_id, ad_id) at most once, marking it with `claim_slot(...)` BEFORE the effects. The slot
markers live in their own key family (`slot:{type}:{request_id}:{ad_id}`), apart from the
client-chosen event-id markers (`evt:{shard}:{event_id}`): no event id, whatever its text, can
pre-mark a slot and so stop a click from being charged. Marking first means: a second click on one
slot (with a fresh event id) is never charged, and a reclaimed entry that a crashed worker had
already applied is not applied again. On Redis the mark, the effects and the label record are one
Lua script (services/gateway/apply_redis.py), so a crash of the worker or of Redis leaves all of an
event or none of it: the reclaimed retry completes it exactly once. On a Redis Cluster the event's
effects live on several nodes, so the script becomes single-slot parts, each with its own mark in
its own slot: a crash between parts leaves the entry pending, and the retry applies the parts still
missing, each exactly once. The log may be sharded over several streams
(services/common/events.py); the worker reads them all through the same interface. In process (no
Redis) a crash loses the whole state anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from services.common.events import (
    DEFAULT_GROUP,
    Delivery,
    Event,
    EventLog,
    EventType,
    RecordLog,
)
from services.common.store import OnlineStore, utc_day
from services.gateway.apply_redis import RedisApplier
from services.gateway.pacing import billable_micros

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Consumer identity and timing. `slot_window_s` must cover the token lifetime (a second
    click on a slot is recognised for that long)."""

    group: str = DEFAULT_GROUP
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    batch: int = 200
    block_ms: int = 1000
    reclaim_idle_ms: int = 30_000
    slot_window_s: float = 2 * 86_400.0


@dataclass(slots=True)
class WorkerStats:
    """Counts a test or /metrics can read."""

    processed: int = 0
    applied: int = 0
    repeated: int = 0  # a second event of the same type for the same slot
    malformed: int = 0
    charged_micros: int = 0
    forgiven_micros: int = 0  # click value past the overspend allowance, not charged


class EventWorker:
    """Consumes the event log (Redis Stream or in-process: the same code for both)."""

    def __init__(self, events: EventLog, store: OnlineStore, labels: RecordLog,
                 config: WorkerConfig | None = None) -> None:
        self.events = events
        self.store = store
        self.labels = labels
        self.config = config or WorkerConfig()
        self.stats = WorkerStats()
        self._group_ready = False
        self._unfinished: list[Delivery] = []  # read by a batch that failed, not acked yet
        # On Redis, claim + effects + label run as one script (services/gateway/apply_redis.py)
        self._atomic = RedisApplier(store, labels) if RedisApplier.usable(store, labels) else None
        self.last_ok = time.monotonic()  # when a batch last completed (worker lag, /readyz)

    async def _ensure_group(self) -> None:
        if not self._group_ready:
            await self.events.ensure_group(self.config.group)
            self._group_ready = True

    async def process_batch(self, max_events: int | None = None,
                            block_ms: int | None = None) -> int:
        """Reclaim stale pending entries, read new ones, apply and ack each; entries handled.

        A Redis that restarted empty has lost the consumer group (NOGROUP): it is made again,
        reading from the start of the (new) log, so events accepted since are applied.
        """
        try:
            handled = await self._process_batch(max_events, block_ms)
        except Exception as exc:
            if "NOGROUP" not in str(exc):
                self._group_ready = False  # whatever broke, check the group on the next pass
                raise
            log.warning("consumer group %r is gone (the log restarted empty): making it again",
                        self.config.group)
            self._group_ready = False
            handled = await self._process_batch(max_events, block_ms)
        self.last_ok = time.monotonic()
        return handled

    async def _process_batch(self, max_events: int | None, block_ms: int | None) -> int:
        await self._ensure_group()
        cfg = self.config
        limit = max_events or cfg.batch
        deliveries = list(self._unfinished)  # kept until handled, if reading fails first
        if len(deliveries) < limit:
            deliveries += await self.events.reclaim(cfg.group, cfg.consumer,
                                                    cfg.reclaim_idle_ms, limit - len(deliveries))
        if len(deliveries) < limit:
            deliveries += await self.events.read(cfg.group, cfg.consumer,
                                                 limit - len(deliveries), block_ms)
        for done, delivery in enumerate(deliveries):
            try:
                await self._handle(delivery)
                # Ack each entry as soon as it is applied: a crash re-delivers as little as can be.
                await self.events.ack(cfg.group, [delivery.entry_id])
            except BaseException:
                self._unfinished = deliveries[done:]
                raise
        self._unfinished = []
        return len(deliveries)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Process until `stop` is set. A failing batch is logged and retried after a pause:
        its entries stay pending and are reclaimed, so nothing is lost."""
        while not stop.is_set():
            try:
                await self.process_batch(block_ms=self.config.block_ms)
            except Exception:  # noqa: BLE001 - the loop must outlive a store hiccup
                log.exception("event batch failed; retrying")
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass

    async def _handle(self, delivery: Delivery) -> None:
        self.stats.processed += 1
        event = delivery.event
        if event is None:
            self.stats.malformed += 1
            log.warning("dropping malformed event entry %s: %s", delivery.entry_id, delivery.error)
            return
        c = event.claims
        if self._atomic is not None:
            await self._handle_atomic(event)
            return
        first = await self.store.claim_slot(event.type.value, c.request_id, c.ad_id,
                                            self.config.slot_window_s)
        if not first:
            self.stats.repeated += 1
            return
        try:
            await self.apply(event)
        except Exception:
            log.exception("event %s (entry %s) marked but not fully applied",
                          event.event_id, delivery.entry_id)
            raise
        self.stats.applied += 1

    async def _handle_atomic(self, event: Event) -> None:
        c = event.claims
        budget: int | None = None
        if event.type is EventType.CLICK and c.price_micros > 0:
            campaign = (await self.store.get_campaigns([c.campaign_id])).get(c.campaign_id)
            budget = campaign.daily_budget_micros if campaign is not None else None
        assert self._atomic is not None
        charged = await self._atomic.apply(event, self.config.slot_window_s, budget)
        if charged is None:
            self.stats.repeated += 1
            return
        if event.type is EventType.CLICK:
            self.stats.charged_micros += charged
            self.stats.forgiven_micros += max(0, int(c.price_micros)) - charged
        self.stats.applied += 1

    async def apply(self, event: Event) -> None:
        """The effects of one event on the online state (no de-duplication here)."""
        c = event.claims
        day = utc_day(event.ts_ms / 1000)
        if event.type is EventType.IMPRESSION:
            await self.store.incr_qscore(c.ad_id, impressions=1)
            await self.store.incr_cap(c.user_id, day, c.campaign_id, 1)
            return
        charged = 0
        if event.type is EventType.CLICK:
            await self.store.incr_qscore(c.ad_id, clicks=1)
            charged = await self.charge(c.campaign_id, day, c.price_micros)
            await self.store.push_behaviour(c.user_id, c.ad_id, c.category_id)
        await self.labels.append({
            "event_id": event.event_id, "type": event.type.value, "request_id": c.request_id,
            "ad_id": c.ad_id, "campaign_id": c.campaign_id, "user_id": c.user_id,
            "scene": c.scene, "position": c.position, "ts_ms": event.ts_ms,
            "charged_micros": charged,
        })

    async def charge(self, campaign_id: int, day: str, price_micros: int) -> int:
        """Charge one click, never taking spend past budget + max(price, 1% budget).

        INCRBY first, then give back what went past the cap: each click's give-back is computed
        from the total it saw, so concurrent workers cannot both slip past the cap.
        """
        price = max(0, int(price_micros))
        if price == 0:
            return 0
        campaign = (await self.store.get_campaigns([campaign_id])).get(campaign_id)
        total = await self.store.incr_spend(campaign_id, day, price)
        if campaign is None:  # deleted since serving: charge as priced, there is no budget
            self.stats.charged_micros += price
            return price
        charged = billable_micros(price, total - price, campaign.daily_budget_micros)
        if charged < price:
            await self.store.incr_spend(campaign_id, day, charged - price)
            self.stats.forgiven_micros += price - charged
        self.stats.charged_micros += charged
        return charged


def now_ms() -> int:
    """Event timestamps are taken by the gateway when it accepts an event."""
    return int(time.time() * 1000)
