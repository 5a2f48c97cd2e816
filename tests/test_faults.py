"""Fault tests on real processes: a private redis-server killed, frozen and restarted under a
running event worker and gateway. Each asserts what a user of the system would notice: events
applied exactly once, a 503 instead of a 500, readiness that tells the truth.

Marked slow (they start processes); each takes a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from services.common.events import Event, EventType, RedisEventLog, RedisRecordLog, TokenClaims
from services.common.store import Campaign, utc_day
from services.common.store_load import load_marketplace
from services.common.store_redis import RedisStore
from services.gateway.worker import EventWorker, WorkerConfig
from services.stack.launcher import free_port
from services.stack.redis_process import RedisProcess
from tests.fixtures_redis import restart_cluster_node, start_cluster, stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.anyio]
CAMPAIGN = 7
CASCADE = str(Path(sys.executable).with_name("cascade"))


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


# -- a gateway process on a private Redis ------------------------------------------------------
API, ADMIN = "fault-frontend-key-0123", "fault-admin-key-0123456"
SECRET = "fault-token-secret-0123456789abcdef"
PREFIX = "fault:"


@dataclass
class GatewayProc:
    redis: RedisProcess
    url: str
    proc: subprocess.Popen
    data: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    def ready(self) -> tuple[int, dict]:
        reply = httpx.get(self.url + "/readyz", timeout=5.0)
        return reply.status_code, reply.json()


def load_store(url: str, data: Path) -> None:
    async def run() -> None:
        store = RedisStore.from_url(url, prefix=PREFIX)
        try:
            await load_marketplace(store, data)
        finally:
            await store.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def gateway_proc(tiny_data: Path, tiny_bundle: Path) -> Iterator[GatewayProc]:
    """`cascade serve all` (every stage in process) on a private, loaded redis-server."""
    rp = RedisProcess(appendonly=True).start()
    load_store(rp.url, tiny_data)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CASCADE_") and k != "REDIS_URL"}
    env.update(CASCADE_API_KEY=API, CASCADE_ADMIN_KEY=ADMIN, CASCADE_TOKEN_SECRET=SECRET,
               CASCADE_TORCH_THREADS="1", REDIS_URL=rp.url, CASCADE_REDIS_PREFIX=PREFIX,
               CASCADE_INTERNAL_KEY="fault-internal-key-0123456")
    proc = subprocess.Popen([CASCADE, "serve", "all", "--bundle", str(tiny_bundle), "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    gp = GatewayProc(rp, f"http://127.0.0.1:{port}", proc, tiny_data)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited: {proc.stderr.read()}")
            try:
                if gp.ready()[0] == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready in 180 s"
            time.sleep(0.3)
        yield gp
    finally:
        rp.thaw()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        rp.stop()


def serve_slots(gp: GatewayProc, n: int, tag: str) -> list[dict]:
    """Ask for ads until `n` slots are served; the slots (with their tracking tokens)."""
    slots: list[dict] = []
    for i in range(200):
        reply = httpx.post(gp.url + "/v1/ads", headers={"X-API-Key": API}, timeout=10.0,
                           json={"request_id": f"{tag}-{i}", "user_id": str(1 + i % 50),
                                 "scene": "home_feed", "slots": 4, "budget_ms": 5000})
        assert reply.status_code == 200, reply.text
        slots += reply.json()["slots"]
        if len(slots) >= n:
            return slots[:n]
    raise AssertionError(f"only {len(slots)} slots served")


def post_event(gp: GatewayProc, event_id: str, token: str, kind: str = "click",
               timeout: float = 10.0) -> httpx.Response:
    return httpx.post(gp.url + "/v1/events", headers={"X-API-Key": API}, timeout=timeout,
                      json={"event_id": event_id, "token": token, "type": kind})


def clicks_applied(gp: GatewayProc, ad_ids: list[int]) -> int:
    client = gp.client()
    try:
        return sum(int(client.hget(f"{PREFIX}qs:{{{a}}}", "clicks") or 0) for a in set(ad_ids))
    finally:
        client.close()


def wait_until(check, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_frozen_redis_events_answer_503_fast_and_nothing_reported_failed_is_applied(
        gateway_proc: GatewayProc) -> None:
    """Finding 3 (and 7): Redis frozen (SIGSTOP). /v1/events answers 503 + Retry-After within
    about a second, never 500; /readyz stays 200 (a blip) but says the store is unreachable;
    after the thaw, the events reported failed were not applied, and their retries (same ids)
    are applied exactly once."""
    gp = gateway_proc
    slots = serve_slots(gp, 6, "frozen")
    ads = [s["ad_id"] for s in slots]
    before = clicks_applied(gp, ads)
    gp.redis.freeze()
    try:
        for i, slot in enumerate(slots[:3]):
            started = time.monotonic()
            reply = post_event(gp, f"frozen-click-{i}", slot["token"])
            took = time.monotonic() - started
            assert reply.status_code == 503, reply.text
            assert reply.headers.get("retry-after")
            assert took < 3.0, f"503 took {took:.1f} s"
        status, body = gp.ready()
        assert status == 200 and body["store"]["status"] == "unreachable", body
    finally:
        gp.redis.thaw()
    time.sleep(1.5)  # anything still in the server's socket buffer has run by now
    assert clicks_applied(gp, ads) == before  # reported failed: not applied
    for i, slot in enumerate(slots):
        reply = post_event(gp, f"frozen-click-{i}", slot["token"])
        assert reply.status_code == 200 and reply.json()["accepted"], reply.text
    assert wait_until(lambda: clicks_applied(gp, ads) == before + 6), (
        clicks_applied(gp, ads) - before)
    time.sleep(0.5)
    assert clicks_applied(gp, ads) == before + 6
    assert gp.ready()[0] == 200


def test_redis_restarted_empty_is_not_ready_until_reloaded_then_events_apply(
        gateway_proc: GatewayProc) -> None:
    """Findings 1 and 7 through a gateway process: Redis killed; events answer 503 (not 500);
    Redis back EMPTY -> /readyz 503 "empty"; after load-store the gateway is ready again and
    events accepted after the restart are applied by the same, never-restarted worker."""
    gp = gateway_proc
    slots = serve_slots(gp, 4, "restart")
    gp.redis.kill()
    reply = post_event(gp, "down-click-0", slots[0]["token"])
    assert reply.status_code == 503 and reply.headers.get("retry-after"), reply.text
    gp.redis.restart(empty=True)
    assert wait_until(lambda: gp.ready()[1]["store"]["status"] == "empty", 10)
    status, body = gp.ready()
    assert status == 503 and not body["ready"], body
    load_store(gp.redis.url, gp.data)
    assert wait_until(lambda: gp.ready()[0] == 200, 10), gp.ready()
    ads = [s["ad_id"] for s in slots]
    for i, slot in enumerate(slots):
        reply = post_event(gp, f"after-restart-{i}", slot["token"])
        assert reply.status_code == 200 and reply.json()["accepted"], reply.text
    assert wait_until(lambda: clicks_applied(gp, ads) == 4), clicks_applied(gp, ads)


async def test_redis_killed_mid_stream_and_restarted_from_aof_applies_each_event_once() -> None:
    """Redis SIGKILLed (five times) while the worker applies a stream of clicks, restarted from its
    append-only file: every click is applied exactly once (spend, counters, one label each).
    With a separate slot claim and effects, a kill between the two left the claim without the
    effects, and the reclaimed entry was then skipped: the event was lost."""
    proc = RedisProcess(appendonly=True).start()
    store = RedisStore.from_url(proc.url, prefix="t:")
    events = RedisEventLog(store.client, "t:")
    labels = RedisRecordLog(store.client, "t:")
    worker = EventWorker(events, store, labels,
                         WorkerConfig(consumer="w", block_ms=50, reclaim_idle_ms=200))
    n, price = 2_000, 1_000
    day = utc_day()
    stop = asyncio.Event()
    task = None
    try:
        await store.put_campaigns([Campaign(CAMPAIGN, 1, 10**12, "active")])
        pipe = store.client.pipeline(transaction=False)
        for i in range(n):
            event = click(f"c{i}", f"r{i}", price)
            pipe.xadd(events.key, event.to_fields())
        await pipe.execute()
        task = asyncio.create_task(worker.run_forever(stop))
        for _ in range(5):
            await asyncio.sleep(0.1)
            proc.restart()  # SIGKILL, then start again from the AOF
        assert await wait_for(lambda: _spend_is(store, day, n * price), 60), (
            await store.get_spend([CAMPAIGN], day), worker.stats)
        assert await wait_for(lambda: _labels_are(labels, n), 10)
        ids = [r["event_id"] for _, r in await labels.range(count=10 * n)]
        assert len(ids) == len(set(ids)) == n
        assert await store.get_qscores([11]) == {11: (0, n)}
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 5.0)
        await store.close()
        proc.stop()


async def _labels_are(labels: RedisRecordLog, n: int) -> bool:
    return await labels.length() == n


async def test_cluster_nodes_killed_mid_stream_and_restarted_from_aof_apply_each_event_once(
        tmp_path: Path) -> None:
    """The same on a 3-master Redis Cluster (AOF, fsync always): two masters SIGKILLed in turn
    while two workers apply clicks from the sharded log. An event's single-slot parts each
    carry their own marker, so every click is still applied exactly once: spend, counters,
    sequence entries and one label each."""
    url, procs = start_cluster(str(tmp_path), appendonly=True)
    store = RedisStore.from_url(url, prefix="t:")
    events = RedisEventLog(store.client, "t:")
    labels = RedisRecordLog(store.client, "t:")
    workers = [EventWorker(events, store, labels, WorkerConfig(
        consumer=f"w{i}", block_ms=50, reclaim_idle_ms=300, batch=50)) for i in range(2)]
    n, price = 300, 1_000
    day = utc_day()
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        await store.put_campaigns([Campaign(CAMPAIGN, 1, 10**12, "active")])
        for i in range(n):
            assert await events.append(click(f"c{i}", f"r{i}", price))
        tasks = [asyncio.create_task(w.run_forever(stop)) for w in workers]
        for i in range(2):  # each restart takes ~2 s (until cluster_state:ok)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(restart_cluster_node, procs, i)
        assert await wait_for(lambda: _spend_is(store, day, n * price), 60), (
            await store.get_spend([CAMPAIGN], day), [w.stats for w in workers])
        assert await wait_for(lambda: _labels_are(labels, n), 10)
        ids = [r["event_id"] for _, r in await labels.range(count=10 * n)]
        assert len(ids) == len(set(ids)) == n
        assert await store.get_qscores([11]) == {11: (0, n)}
        assert len((await store.get_user_context("u1")).hist_ad_id) == min(n, store.sequence_len)
    finally:
        stop.set()
        for task in tasks:
            await asyncio.wait_for(task, 10.0)
        await store.close()
        stop_cluster(procs)
