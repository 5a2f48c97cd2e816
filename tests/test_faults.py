"""Fault tests on real processes: a private redis-server killed, frozen and restarted under a
running event worker and gateway. Each asserts what a user of the system would notice: events
applied exactly once, a 503 instead of a 500, readiness that tells the truth.

Marked slow (they start processes); each takes a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from services.common.events import Event, EventType, RedisEventLog, RedisRecordLog, TokenClaims
from services.common.store import Campaign, utc_day
from services.common.store_redis import RedisStore
from services.gateway.worker import EventWorker, WorkerConfig
from services.stack.redis_process import RedisProcess

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.anyio]
CAMPAIGN = 7


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


def click(event_id: str, request_id: str, price: int = 1_000) -> Event:
    claims = TokenClaims(request_id, 11, CAMPAIGN, "u1", "home_feed", price, 301, 0,
                         int(time.time()) + 3600)
    return Event(event_id, EventType.CLICK, claims, int(time.time() * 1000))


async def wait_for(check, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await check():
                return True
        except Exception:  # noqa: BLE001 - the store may still be coming back
            pass
        await asyncio.sleep(0.05)
    return False


async def test_worker_recovers_after_redis_restarts_empty(redis_proc: RedisProcess) -> None:
    """Finding 1: after Redis restarts empty the consumer group is gone (NOGROUP); the worker
    makes it again and applies every event accepted since, without a gateway restart."""
    store = RedisStore.from_url(redis_proc.url, prefix="t:")
    events = RedisEventLog(store.client, "t:")
    worker = EventWorker(events, store, RedisRecordLog(store.client, "t:"),
                         WorkerConfig(consumer="w", block_ms=50))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run_forever(stop))
    day = utc_day()
    try:
        await store.put_campaigns([Campaign(CAMPAIGN, 1, 10**9, "active")])
        for i in range(5):
            assert await events.append(click(f"before-{i}", f"rb{i}"))
        assert await wait_for(lambda: _spend_is(store, day, 5_000))

        redis_proc.restart(empty=True)
        await store.put_campaigns([Campaign(CAMPAIGN, 1, 10**9, "active")])  # load-store again
        accepted = 0
        for i in range(20):
            if await _append_retrying(events, click(f"after-{i}", f"ra{i}")):
                accepted += 1
        assert accepted == 20
        assert await wait_for(lambda: _spend_is(store, day, 20_000)), (
            f"spend {await store.get_spend([CAMPAIGN], day)}, stats {worker.stats}")
        assert await events.pending(worker.config.group) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)
        await store.close()


async def _spend_is(store: RedisStore, day: str, micros: int) -> bool:
    return (await store.get_spend([CAMPAIGN], day))[CAMPAIGN] == micros


async def _append_retrying(events: RedisEventLog, event: Event) -> bool:
    for _ in range(50):
        try:
            return await events.append(event) is not None
        except Exception:  # noqa: BLE001 - the connection pool reconnects after the restart
            await asyncio.sleep(0.05)
    return False
