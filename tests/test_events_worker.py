"""The event worker on a real Redis (store + stream) and in process: exact counters, spend,
behaviour, labels, duplicates, and crash-reclaim."""

from __future__ import annotations

import asyncio

import pytest

from services.common.events import (
    Event,
    EventType,
    MemoryEventLog,
    MemoryRecordLog,
    RedisEventLog,
    RedisRecordLog,
    TokenClaims,
)
from services.common.store import Campaign, OnlineStore, utc_day
from services.common.store_redis import RedisStore
from services.gateway.worker import EventWorker, WorkerConfig

pytestmark = pytest.mark.anyio
TS_MS = 1_750_000_000_000  # 2025-06-15 UTC
DAY = utc_day(TS_MS / 1000)
CAMPAIGN = 7


def logs_for(store: OnlineStore):
    """The event log and label log of the same backend as `store` (sharing its connection)."""
    if isinstance(store, RedisStore):
        return (RedisEventLog(store.client, store.prefix),
                RedisRecordLog(store.client, store.prefix))
    return MemoryEventLog(), MemoryRecordLog()


def ev(event_id: str, kind: EventType, *, request_id: str = "r1", ad_id: int = 11,
       user_id: str = "u1", price: int = 5_000, category_id: int = 301,
       campaign_id: int = CAMPAIGN) -> Event:
    claims = TokenClaims(request_id, ad_id, campaign_id, user_id, "home_feed", price,
                         category_id, 0, 2_000_000_000)
    return Event(event_id, kind, claims, TS_MS)


def worker_for(store: OnlineStore, consumer: str = "w1", idle_ms: int = 30_000) -> EventWorker:
    events, labels = logs_for(store)
    return EventWorker(events, store, labels,
                       WorkerConfig(consumer=consumer, reclaim_idle_ms=idle_ms, block_ms=50))


async def test_exact_counters_caps_spend_behaviour_and_labels(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 1_000_000, "active")])
    worker = worker_for(store)
    imp, clk, conv = EventType.IMPRESSION, EventType.CLICK, EventType.CONVERSION
    for event in [
        ev("i1", imp, request_id="r1"), ev("i2", imp, request_id="r2"),
        ev("i3", imp, request_id="r3", user_id="u2"),
        ev("i4", imp, request_id="r4", ad_id=12, category_id=302),
        ev("c1", clk, request_id="r1", price=4_321),
        ev("c2", clk, request_id="r4", ad_id=12, category_id=302, price=1_000),
        ev("v1", conv, request_id="r1"),
    ]:
        assert await worker.events.append(event)
    assert await worker.process_batch(100) == 7
    assert await store.get_qscores([11, 12]) == {11: (3, 1), 12: (1, 1)}
    assert (await store.get_user_context("u1", DAY)).caps == {CAMPAIGN: 3}
    assert (await store.get_user_context("u2", DAY)).caps == {CAMPAIGN: 1}
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 5_321}
    ctx = await store.get_user_context("u1", DAY)
    assert ctx.hist_ad_id[:2] == [12, 11]  # newest click first
    assert ctx.hist_category_id[:2] == [302, 301]
    labels = [r for _, r in await worker.labels.range()]
    assert [(r["type"], r["request_id"], r["ad_id"], r["charged_micros"]) for r in labels] == [
        ("click", "r1", "11", "4321"), ("click", "r4", "12", "1000"),
        ("conversion", "r1", "11", "0")]
    assert await worker.events.pending(worker.config.group) == 0


async def test_duplicates_count_once(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 1_000_000, "active")])
    worker = worker_for(store)
    assert await worker.events.append(ev("c1", EventType.CLICK))
    assert await worker.events.append(ev("c1", EventType.CLICK)) is None  # same event id
    # a fresh event id for a slot already clicked: delivered, but not charged again
    assert await worker.events.append(ev("c1-retry", EventType.CLICK))
    assert await worker.process_batch(100) == 2
    assert worker.stats.repeated == 1
    assert await store.get_qscores([11]) == {11: (0, 1)}
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 5_000}
    assert (await store.get_user_context("u1", DAY)).hist_ad_id == [11]


async def test_spend_stops_at_budget_plus_one_click(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 10_000, "active")])
    worker = worker_for(store)
    for i in range(5):
        await worker.events.append(ev(f"c{i}", EventType.CLICK, request_id=f"r{i}", price=4_000))
    await worker.process_batch(100)
    # 4k, 8k, 12k (under budget before it: full price), then 2k of the 4k allowance, then 0
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 14_000}
    assert worker.stats.charged_micros == 14_000
    assert worker.stats.forgiven_micros == 6_000
    assert await store.get_qscores([11]) == {11: (0, 5)}  # every click still teaches Qscore


async def test_crashed_worker_entries_are_reclaimed_and_applied_once(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 1_000_000, "active")])
    crashed = worker_for(store, consumer="crashed", idle_ms=100)
    rescuer = EventWorker(crashed.events, store, crashed.labels,
                          WorkerConfig(consumer="rescuer", reclaim_idle_ms=100, block_ms=50))
    for i in range(4):
        await crashed.events.append(ev(f"i{i}", EventType.IMPRESSION, request_id=f"r{i}"))
    await crashed.events.append(ev("c0", EventType.CLICK, request_id="r0", price=2_500))
    await crashed.events.ensure_group(crashed.config.group)
    taken = await crashed.events.read(crashed.config.group, "crashed", count=100)
    assert len(taken) == 5  # read, then the process died without applying or acking
    assert await rescuer.process_batch(100) == 0  # nothing new, nothing idle yet
    await asyncio.sleep(0.15)
    assert await rescuer.process_batch(100) == 5
    assert await store.get_qscores([11]) == {11: (4, 1)}
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 2_500}
    assert await rescuer.events.pending(rescuer.config.group) == 0
    await asyncio.sleep(0.15)
    assert await rescuer.process_batch(100) == 0  # acked: never delivered again


async def test_a_batch_that_fails_part_way_is_finished_on_the_next_pass(
        store: OnlineStore) -> None:
    """A dropped connection mid-batch (here: the third ack) leaves the rest of the batch pending
    for this worker; the next pass handles it at once, not after `reclaim_idle_ms`, and the
    entry that was applied but not acked is not applied twice."""
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 1_000_000, "active")])
    worker = worker_for(store, idle_ms=3_600_000)
    acks = 0
    real_ack = worker.events.ack

    async def ack_dropping_the_third(group, entry_ids):
        nonlocal acks
        acks += 1
        if acks == 3:
            raise ConnectionError("Connection closed by server.")
        return await real_ack(group, entry_ids)

    worker.events.ack = ack_dropping_the_third
    for i in range(5):
        await worker.events.append(ev(f"c{i}", EventType.CLICK, request_id=f"r{i}", price=1_000))
    with pytest.raises(ConnectionError):
        await worker.process_batch(100)
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 3_000}
    assert await worker.process_batch(100) == 3  # the unacked third, then the two never handled
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 5_000}
    assert worker.stats.repeated == 1 and worker.stats.applied == 5
    assert await worker.events.pending(worker.config.group) == 0


async def test_run_forever_consumes_until_stopped(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 1_000_000, "active")])
    worker = worker_for(store)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run_forever(stop))
    for i in range(3):
        await worker.events.append(ev(f"i{i}", EventType.IMPRESSION, request_id=f"r{i}"))
    for _ in range(100):
        if (await store.get_qscores([11]))[11] == (3, 0):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 2.0)
    assert (await store.get_qscores([11]))[11] == (3, 0)


async def test_malformed_entry_is_acked_and_counted(redis_url, redis_prefix,
                                                    redis_client) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        worker = worker_for(store)
        await worker.events.ensure_group(worker.config.group)
        redis_client.xadd(worker.events.keys[0], {"event_id": "x", "type": "click"})
        assert await worker.process_batch(10) == 1
        assert worker.stats.malformed == 1
        assert await worker.events.pending(worker.config.group) == 0
    finally:
        await store.close()


async def test_concurrent_charges_never_pass_the_cap(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 10_000, "active")])
    workers = [worker_for(store, consumer=f"w{i}") for i in range(4)]
    charged = await asyncio.gather(*(workers[i % 4].charge(CAMPAIGN, DAY, 4_000)
                                     for i in range(20)))
    spend = (await store.get_spend([CAMPAIGN], DAY))[CAMPAIGN]
    assert spend == sum(charged)
    assert 10_000 <= spend <= 14_000  # budget + one click, however the increments interleave


async def test_client_event_id_cannot_pre_mark_a_slot(store: OnlineStore) -> None:
    """Finding 2: an impression whose event id is the worker's own slot-marker text must not
    stop the real click on that slot from being charged."""
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 1_000_000, "active")])
    worker = worker_for(store)
    forged = "slot:click:r1:11"
    assert await worker.events.append(ev(forged, EventType.IMPRESSION))
    assert await worker.events.append(ev("real-click", EventType.CLICK, price=3_000))
    assert await worker.process_batch(100) == 2
    assert worker.stats.repeated == 0
    assert await store.get_qscores([11]) == {11: (1, 1)}
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 3_000}
