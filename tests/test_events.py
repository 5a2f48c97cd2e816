"""The event log: the same pending / ack / reclaim / de-duplication behaviour on a real Redis
Stream and on the in-process log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.events import (
    Event,
    EventLog,
    EventType,
    MemoryEventLog,
    MemoryRecordLog,
    RecordLog,
    RedisEventLog,
    RedisRecordLog,
    TokenClaims,
)
from tests.fixtures_redis import prefix_for

pytestmark = pytest.mark.anyio
GROUP = "workers"


def claims(ad_id: int = 11, request_id: str = "r1", user_id: str = "u1",
           price: int = 5_000) -> TokenClaims:
    return TokenClaims(request_id, ad_id, 7, user_id, "home_feed", price, 301, 0, 2_000_000_000)


def event(event_id: str, kind: EventType = EventType.IMPRESSION, **kw: object) -> Event:
    return Event(event_id, kind, claims(**kw), 1_750_000_000_000)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def logs(request: pytest.FixtureRequest) -> AsyncIterator[tuple[EventLog, RecordLog]]:
    """In process, on one Redis (one stream) and on a Redis Cluster (8 sharded streams)."""
    if request.param == "memory":
        yield MemoryEventLog(), MemoryRecordLog()
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis"
                                  else "redis_cluster_url")
    prefix = prefix_for(request, url)
    events = RedisEventLog.from_url(url, prefix)
    yield events, RedisRecordLog(events.client, prefix)
    await events.close()


async def test_event_round_trips_and_stays_pending_until_acked(logs) -> None:
    events, _ = logs
    await events.ensure_group(GROUP)
    await events.ensure_group(GROUP)  # idempotent
    original = event("e1", EventType.CLICK, price=1_234_567)
    entry_id = await events.append(original)
    assert entry_id
    [delivery] = await events.read(GROUP, "c1")
    assert delivery.entry_id == entry_id
    assert delivery.event == original
    assert await events.pending(GROUP) == 1
    assert await events.read(GROUP, "c1") == []  # delivered once, not re-read
    assert await events.ack(GROUP, [entry_id]) == 1
    assert await events.ack(GROUP, [entry_id]) == 0
    assert await events.pending(GROUP) == 0


async def test_duplicate_event_id_is_appended_once_within_the_window(logs) -> None:
    events, _ = logs
    assert await events.append(event("dup"), dedupe_window_s=0.2)
    assert await events.append(event("dup"), dedupe_window_s=0.2) is None
    assert await events.append(event("other"), dedupe_window_s=0.2)
    assert await events.length() == 2
    await asyncio.sleep(0.3)
    assert await events.append(event("dup"), dedupe_window_s=0.2)  # window over
    assert await events.length() == 3


async def test_group_created_after_appends_reads_from_the_start(logs) -> None:
    events, _ = logs
    for i in range(5):
        await events.append(event(f"e{i}"))
    await events.ensure_group(GROUP)
    first = await events.read(GROUP, "c1", count=3)
    rest = await events.read(GROUP, "c2", count=10)
    assert len(first) == 3  # a read hands out at most `count`, even over several shards
    got = [d.event.event_id for d in first + rest]
    if getattr(events, "shards", 1) == 1:
        assert got == [f"e{i}" for i in range(5)]
    else:  # sharded: each event exactly once, in order within its shard only
        assert sorted(got) == [f"e{i}" for i in range(5)]


async def test_crashed_consumers_entries_are_reclaimed_after_idle_time(logs) -> None:
    events, _ = logs
    await events.ensure_group(GROUP)
    for i in range(3):
        await events.append(event(f"e{i}"))
    taken = await events.read(GROUP, "crashed", count=10)
    await events.ack(GROUP, [taken[0].entry_id])  # it handled one, then died
    assert await events.reclaim(GROUP, "rescuer", min_idle_ms=10_000) == []  # not idle yet
    await asyncio.sleep(0.12)
    reclaimed = await events.reclaim(GROUP, "rescuer", min_idle_ms=100)
    # the two it did not ack (in log order on one stream; any order over shards)
    assert sorted(d.event.event_id for d in reclaimed) == sorted(
        d.event.event_id for d in taken[1:])
    if getattr(events, "shards", 1) == 1:
        assert [d.event.event_id for d in reclaimed] == ["e1", "e2"]
    # the rescuer now owns them: an immediate second reclaim finds nothing idle
    assert await events.reclaim(GROUP, "third", min_idle_ms=100) == []
    assert await events.ack(GROUP, [d.entry_id for d in reclaimed]) == 2
    assert await events.pending(GROUP) == 0


async def test_blocking_read_wakes_on_append(logs) -> None:
    events, _ = logs
    await events.ensure_group(GROUP)

    async def later() -> None:
        await asyncio.sleep(0.05)
        await events.append(event("late"))

    task = asyncio.create_task(later())
    started = asyncio.get_running_loop().time()
    got = await events.read(GROUP, "c1", block_ms=5_000)
    await task
    assert [d.event.event_id for d in got] == ["late"]
    assert asyncio.get_running_loop().time() - started < 4.0
    assert await events.read(GROUP, "c1", block_ms=50) == []  # times out empty


async def test_record_log_appends_and_pages(logs) -> None:
    _, labels = logs
    ids = [await labels.append({"type": "click", "ad_id": i, "ctr": 0.5}) for i in range(5)]
    assert await labels.length() == 5
    page = await labels.range(count=3)
    assert [r["ad_id"] for _, r in page] == ["0", "1", "2"]
    assert page[0][1] == {"type": "click", "ad_id": "0", "ctr": "0.5"}
    rest = await labels.range(after=page[-1][0])
    assert [i for i, _ in rest] == ids[3:]


async def test_malformed_stream_entry_is_delivered_as_an_error(redis_url, redis_prefix,
                                                               redis_client) -> None:
    events = RedisEventLog.from_url(redis_url, redis_prefix)
    try:
        await events.ensure_group(GROUP)
        redis_client.xadd(events.keys[0], {"event_id": "x", "type": "swipe"})
        [delivery] = await events.read(GROUP, "c1")
        assert delivery.event is None
        assert delivery.error.startswith("event entry has no")
    finally:
        await events.close()


async def test_stream_is_capped_near_maxlen(redis_url, redis_prefix) -> None:
    events = RedisEventLog.from_url(redis_url, redis_prefix, maxlen=100)
    memory = MemoryEventLog(maxlen=100)
    try:
        for i in range(1000):
            await events.append(event(f"e{i}"))
            await memory.append(event(f"e{i}"))
        assert 100 <= await events.length() < 1000  # MAXLEN ~ trims whole nodes
        assert await memory.length() == 100
    finally:
        await events.close()
