"""The store, the event log and the worker on a real 3-master Redis Cluster: where keys land,
exact counts with two workers over the sharded log, a crash between the single-slot parts of
an event, and a bulk load. (The shared store / event / worker tests also run on the cluster
through the `store` and `logs` fixtures; these cover what only a cluster has.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from services.common.config import Settings
from services.common.events import (
    Event,
    EventType,
    RedisEventLog,
    RedisRecordLog,
    TokenClaims,
    make_event_log,
    shard_of,
)
from services.common.store import Ad, Campaign, utc_day
from services.common.store_load import load_marketplace
from services.common.store_redis import RedisStore, cluster_url_nodes, redis_client
from services.gateway.apply_redis import PartsStopped
from services.gateway.worker import EventWorker, WorkerConfig

pytestmark = pytest.mark.anyio
TS_MS = 1_750_000_000_000
DAY = utc_day(TS_MS / 1000)
CAMPAIGN = 7


def ev(event_id: str, kind: EventType, request_id: str, *, ad_id: int = 11,
       user_id: str = "u1", price: int = 1_000) -> Event:
    claims = TokenClaims(request_id, ad_id, CAMPAIGN, user_id, "home_feed", price, 301, 0,
                         2_000_000_000)
    return Event(event_id, kind, claims, TS_MS)


@pytest.fixture
async def cluster_store(redis_cluster_url: str, cluster_prefix: str) -> RedisStore:
    store = RedisStore.from_url(redis_cluster_url, prefix=cluster_prefix)
    yield store
    await store.close()


def worker(store: RedisStore, consumer: str, idle_ms: int = 30_000) -> EventWorker:
    return EventWorker(RedisEventLog(store.client, store.prefix), store,
                       RedisRecordLog(store.client, store.prefix),
                       WorkerConfig(consumer=consumer, block_ms=50, reclaim_idle_ms=idle_ms,
                                    batch=20))


def test_cluster_url_selects_the_cluster_client_and_names_its_nodes() -> None:
    nodes, user, password = cluster_url_nodes("redis+cluster://app:s3cret@h1:7000,h2:7001/0")
    assert nodes == [("h1", 7000), ("h2", 7001)] and (user, password) == ("app", "s3cret")
    assert isinstance(redis_client("redis+cluster://127.0.0.1:7000"), RedisCluster)
    assert isinstance(redis_client("redis://127.0.0.1:6379/0"), aioredis.Redis)
    with pytest.raises(ValueError, match="database 0"):
        cluster_url_nodes("redis+cluster://h1:7000/2")
    with pytest.raises(ValueError, match="bad node"):
        cluster_url_nodes("redis+cluster://h1:port")


async def test_a_full_connection_pool_makes_callers_wait_and_counts_stay_exact(
        redis_cluster_url: str, cluster_prefix: str) -> None:
    """redis-py's cluster client fails a pipeline once a node's pool is full, then closes every
    connection and re-runs the pipelines in flight, so increments were applied twice (CI: 121
    of 100). With 2 connections and 100 concurrent increments, every caller must wait its turn
    and each increment land once."""
    store = RedisStore.from_url(redis_cluster_url, prefix=cluster_prefix, max_connections=2)
    try:
        await asyncio.gather(*(store.incr_qscore(9, impressions=1) for _ in range(100)))
        await asyncio.gather(*(store.incr_spend(5, DAY, 3) for _ in range(100)))
        assert await store.get_qscores([9]) == {9: (100, 0)}
        assert await store.get_spend([5], DAY) == {5: 300}
    finally:
        await store.close()


async def test_keys_read_together_share_a_slot_and_event_shards_spread_over_all_nodes(
        cluster_store: RedisStore) -> None:
    store = cluster_store
    user_keys = [store.tagged("user", 42), store.tagged("seq", 42), store.tagged("cap", 42, DAY)]
    assert len({key_slot(k.encode()) for k in user_keys}) == 1
    catalog = [store.catalog_key(n) for n in ("version", "changes", "bulk")]
    assert len({key_slot(k.encode()) for k in catalog}) == 1
    events = make_event_log(Settings(redis_url="redis+cluster://x:1", redis_prefix=store.prefix),
                            store.client)
    assert isinstance(events, RedisEventLog) and events.shards == 8
    client = store.client
    await client.initialize()
    masters = {n.name for n in client.get_primaries()}
    assert len(masters) == 3
    assert {client.get_node_from_key(k).name for k in events.keys} == masters
    shard = shard_of("evt-1", events.shards)
    assert (key_slot((events.markers[shard] + "evt-1").encode())
            == key_slot(events.keys[shard].encode()))
    # the append script really runs on the cluster (single slot), and de-duplicates
    assert await events.append(ev("evt-1", EventType.IMPRESSION, "r1"))
    assert await events.append(ev("evt-1", EventType.IMPRESSION, "r1")) is None


async def test_two_workers_over_the_sharded_log_count_every_event_exactly_once(
        cluster_store: RedisStore) -> None:
    store = cluster_store
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 10**12, "active")])
    workers = [worker(store, "w1"), worker(store, "w2")]
    log = workers[0].events
    n_imp, n_clk, price = 120, 60, 1_000
    accepted = 0
    for i in range(n_imp):
        accepted += await log.append(ev(f"i{i}", EventType.IMPRESSION, f"r{i}",
                                        ad_id=11 + i % 3, user_id=f"u{i % 7}")) is not None
    for i in range(n_clk):
        accepted += await log.append(ev(f"c{i}", EventType.CLICK, f"r{i}", ad_id=11 + i % 3,
                                        user_id=f"u{i % 7}", price=price)) is not None
    for i in range(30):  # client retries of accepted events: refused at append
        assert await log.append(ev(f"c{i}", EventType.CLICK, f"r{i}")) is None
    assert accepted == n_imp + n_clk
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run_forever(stop)) for w in workers]
    try:
        for _ in range(200):
            if sum(w.stats.processed for w in workers) >= accepted:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert sum(w.stats.applied for w in workers) == accepted
    assert all(w.stats.processed > 0 for w in workers)  # the group shared the work
    qs = await store.get_qscores([11, 12, 13])
    assert sum(i for i, _ in qs.values()) == n_imp and sum(c for _, c in qs.values()) == n_clk
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: n_clk * price}
    assert await workers[0].labels.length() == n_clk
    assert await log.pending(workers[0].config.group) == 0
    contexts = [await store.get_user_context(f"u{u}", DAY) for u in range(7)]
    assert sum(sum(ctx.caps.values()) for ctx in contexts) == n_imp
    assert sum(len(ctx.hist_ad_id) for ctx in contexts) == n_clk


async def test_a_crash_between_single_slot_parts_is_completed_exactly_once(
        cluster_store: RedisStore) -> None:
    """The click's spend part ran, then the worker died (before the ad, user and label parts
    and before the ack): the reclaimed retry adds what is missing and charges nothing twice."""
    store = cluster_store
    await store.put_campaigns([Campaign(CAMPAIGN, 1, 10**9, "active")])
    crashed, rescuer = worker(store, "crashed", 100), worker(store, "rescuer", 100)
    click = ev("c1", EventType.CLICK, "r1", price=2_500)
    await crashed.events.append(click)
    await crashed.events.ensure_group(crashed.config.group)
    [delivery] = await crashed.events.read(crashed.config.group, "crashed", count=10)
    assert crashed._atomic is not None
    with pytest.raises(PartsStopped):
        await crashed._atomic.apply(delivery.event, 3600, 10**9, parts=1)
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 2_500}  # charged ...
    assert await store.get_qscores([11]) == {11: (0, 0)}  # ... nothing else yet
    await asyncio.sleep(0.15)
    assert await rescuer.process_batch(10) == 1
    assert rescuer.stats.applied == 1 and rescuer.stats.charged_micros == 2_500
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 2_500}
    assert await store.get_qscores([11]) == {11: (0, 1)}
    assert (await store.get_user_context("u1", DAY)).hist_ad_id == [11]
    [(_, label)] = await rescuer.labels.range()
    assert label["event_id"] == "c1" and label["charged_micros"] == "2500"
    # a second click on the same served slot (fresh event id) is a repeat: no part applies
    await rescuer.events.append(ev("c1-again", EventType.CLICK, "r1", price=2_500))
    assert await rescuer.process_batch(10) == 1
    assert rescuer.stats.repeated == 1
    assert await store.get_spend([CAMPAIGN], DAY) == {CAMPAIGN: 2_500}
    assert await rescuer.labels.length() == 1


async def test_bulk_load_and_catalog_changes_on_the_cluster(cluster_store: RedisStore,
                                                            tiny_data: Path) -> None:
    store = cluster_store
    counts = await load_marketplace(store, tiny_data)
    assert counts.ads > 1_000 and counts.users > 0 and counts.sequences > 0
    ads = await store.all_ads()  # SSCAN + the pipelined HMGET path (>= 1000 ids)
    assert len(ads) == counts.ads
    baseline = await store.catalog_baseline()
    assert baseline > 0
    await store.upsert_ad(Ad(10**9, ads[0].campaign_id, 1, 3, scenes=("search",),
                             bid_micros=1_000))
    assert await store.set_ad_status(ads[1].ad_id, "paused")
    changes = await store.catalog_changes(baseline)
    assert changes.ad_ids == (10**9, ads[1].ad_id) and not changes.full_reload
    assert changes.version == baseline + 2
    assert (await store.get_ads([ads[1].ad_id]))[ads[1].ad_id].status == "paused"
