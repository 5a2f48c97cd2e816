"""End to end: the gateway started twice, as real processes on loopback ports.

(a) `cascade serve all`: every stage in the gateway's process, the in-process store filled from
    tiny_data at start-up.
(b) `cascade serve retrieval|prerank|rank` as three uvicorn processes, a gateway process using
    them over HTTP, and a real Redis (unique prefix) loaded with load_marketplace.

A "hung" stage is a stage process stopped with SIGSTOP: the kernel still accepts connections,
nothing answers. A killed stage is SIGKILLed. Both must give a complete, degraded answer long
before the hang would end, naming the stage. Assertions are on flags and completion, not on
tight timings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from loadtest.procstat import descendants, server_pids, thread_cpu_seconds
from services.common.store import utc_day
from services.common.store_load import load_marketplace
from services.common.store_redis import RedisStore

pytestmark = pytest.mark.slow
API, ADMIN = "e2e-frontend-key-0123", "e2e-admin-key-01234567"
SECRET = "e2e-secret-0123456789abcdef"
INTERNAL = "e2e-internal-key-0123456"
CASCADE = str(Path(sys.executable).with_name("cascade"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(role: str, bundle: Path, env: dict[str, str], *extra: str
           ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([CASCADE, "serve", role, "--bundle", str(bundle), "--port",
                             str(port), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(procs: list[tuple[subprocess.Popen, str]], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    for proc, url in procs:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{url} exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready within {timeout} s")
            time.sleep(0.3)


def _stop(procs: list[tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
    for proc, _ in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CASCADE_") and k != "REDIS_URL"}
    env.update(CASCADE_API_KEY=API, CASCADE_ADMIN_KEY=ADMIN, CASCADE_TOKEN_SECRET=SECRET,
               CASCADE_INTERNAL_KEY=INTERNAL,
               CASCADE_TORCH_THREADS="1", **extra)
    return env


def ads(url: str, user: str, rid: str, **kw: Any) -> dict[str, Any]:
    body = {"request_id": rid, "user_id": user, "scene": "home_feed", "slots": 4,
            "budget_ms": 3000, **kw}
    reply = httpx.post(url + "/v1/ads", json=body, headers={"X-API-Key": API}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def event(url: str, token: str, kind: str, event_id: str) -> dict[str, Any]:
    reply = httpx.post(url + "/v1/events", json={"event_id": event_id, "token": token,
                                                 "type": kind},
                       headers={"X-API-Key": API}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def degraded(response: dict[str, Any]) -> list[str]:
    return [s["name"] for s in response["stages"] if s["degraded"]]


def assert_priced(response: dict[str, Any]) -> None:
    slots = response["slots"]
    assert slots, response
    campaigns = [s["campaign_id"] for s in slots]
    assert len(set(campaigns)) == len(campaigns)
    assert [s["ecpm"] for s in slots] == sorted((s["ecpm"] for s in slots), reverse=True)
    for s in slots:  # price <= bid  <=>  price x pCTR x 1000 <= eCPM (CPC and oCPA alike)
        assert s["price_micros"] * s["pctr"] * 1000 <= s["ecpm"] * (1 + 1e-6)
    for a, b in zip(slots, slots[1:], strict=False):  # GSP: the least that keeps the slot
        paid = a["price_micros"] * a["pctr"] * 1000
        slack = a["pctr"] * 1000  # one micro of rounding
        assert paid >= b["ecpm"] * (1 - 1e-6) - slack or paid >= a["ecpm"] * (1 - 1e-6) - slack
    assert all(s["price_micros"] >= 1 and s["token"] for s in slots)


def wait_for(check, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture
def embedded(tiny_bundle: Path, tiny_data: Path) -> Iterator[str]:
    procs = [_start("all", tiny_bundle, _env(), "--data", str(tiny_data))]
    try:
        _wait_ready(procs)
        yield procs[0][1]
    finally:
        _stop(procs)


def test_embedded_gateway_serves_and_counts_events_once(embedded: str) -> None:
    url = embedded
    first = ads(url, "3", "e1")
    assert not degraded(first) and len(first["stages"]) == 6
    assert_priced(first)
    slot = first["slots"][0]
    assert event(url, slot["token"], "click", "ev-1")["accepted"]
    assert event(url, slot["token"], "click", "ev-1")["duplicate"]
    bad = httpx.post(url + "/v1/ads", json={"request_id": "x", "user_id": "3",
                                            "scene": "moon", "slots": 1},
                     headers={"X-API-Key": API})
    assert bad.status_code == 422 and "moon" in bad.json()["detail"]
    assert httpx.post(url + "/v1/ads", json={}).status_code == 401
    metrics = httpx.get(url + "/metrics").text
    assert "cascade_gateway_stage_seconds" in metrics
    # the stage pools' threads carry their stage's name for the kernel, so the load test can
    # split the server's CPU between the event loop and each stage (loadtest.procstat)
    groups = {group for group, _ in thread_cpu_seconds(
        server_pids([int(url.rsplit(":", 1)[1])])).values()}
    assert {"event_loop", "stage-retrieval", "stage-prerank", "stage-rank"} <= groups


@pytest.fixture
def http_stack(tiny_bundle: Path, tiny_data: Path, redis_url: str, redis_prefix: str,
               tmp_path: Path) -> Iterator[dict[str, Any]]:
    async def load() -> None:
        store = RedisStore.from_url(redis_url, prefix=redis_prefix)
        await load_marketplace(store, tiny_data)
        await store.close()

    asyncio.run(load())
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps({"extra": {"gateway": {"freq_cap": 1}}}))
    stages = {name: _start(name, tiny_bundle, _env()) for name in ("retrieval", "prerank",
                                                                   "rank")}
    procs = list(stages.values())
    try:
        _wait_ready(procs)
        gateway = _start("gateway", tiny_bundle, _env(
            REDIS_URL=redis_url, CASCADE_REDIS_PREFIX=redis_prefix, CASCADE_CONFIG=str(config),
            CASCADE_RETRIEVAL_URL=stages["retrieval"][1], CASCADE_PRERANK_URL=stages["prerank"][1],
            CASCADE_RANK_URL=stages["rank"][1]))
        procs.append(gateway)
        _wait_ready([gateway])
        yield {"url": gateway[1], "stages": {k: p for k, (p, _) in stages.items()},
               "prefix": redis_prefix, "gateway": gateway[0]}
    finally:
        _stop(procs)


def _allowed_cpus(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


def test_gateway_over_http_stages_and_redis(http_stack: dict[str, Any], redis_url: str) -> None:
    url, prefix = http_stack["url"], http_stack["prefix"]
    # with REDIS_URL the gateway forks one worker per core (one core: it serves in-process),
    # each pinned to its own core
    workers = descendants([http_stack["gateway"].pid]) - {http_stack["gateway"].pid}
    cores = _allowed_cpus(http_stack["gateway"].pid)
    assert len(workers) == (os.cpu_count() if (os.cpu_count() or 1) > 1 else 0)
    if len(workers) == len(cores):
        pinned = [_allowed_cpus(pid) for pid in workers]
        assert all(len(p) == 1 for p in pinned) and set().union(*pinned) == cores
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    first = ads(url, "5", "h1", debug=True)
    assert not degraded(first), first["stages"]
    assert_priced(first)
    slot = first["slots"][0]

    # duplicated impression counts once; the frequency cap (1/day here) then drops the campaign
    assert event(url, slot["token"], "impression", "imp-1")["accepted"]
    assert event(url, slot["token"], "impression", "imp-1")["duplicate"]
    assert wait_for(lambda: client.hget(f"{prefix}qs:{{{slot['ad_id']}}}", "impressions") == "1")
    time.sleep(0.5)
    assert client.hget(f"{prefix}qs:{{{slot['ad_id']}}}", "impressions") == "1"
    assert client.hget(f"{prefix}cap:{{5}}:{utc_day()}", str(slot["campaign_id"])) == "1"
    again = ads(url, "5", "h2")
    assert slot["campaign_id"] not in {s["campaign_id"] for s in again["slots"]}

    # a click lands in the user's sequence, which the next ranking reads
    click_slot = again["slots"][0]
    assert event(url, click_slot["token"], "click", "clk-1")["accepted"]
    assert wait_for(lambda: (client.lindex(f"{prefix}seq:{{5}}", 0) or "").startswith(
        f"{click_slot['ad_id']}:"))

    # a hung rank stage (SIGSTOP): complete answer, rank degraded, far before any hang ends
    rank = http_stack["stages"]["rank"]
    os.kill(rank.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        hung = ads(url, "6", "h3", budget_ms=300)
        assert time.monotonic() - started < 10
        assert degraded(hung) == ["rank"] and "deadline" in hung["stages"][4]["reason"]
        assert_priced(hung)
    finally:
        os.kill(rank.pid, signal.SIGCONT)

    # a killed prerank stage: complete answer, prerank degraded
    prerank = http_stack["stages"]["prerank"]
    prerank.kill()
    prerank.wait(timeout=10)
    killed = ads(url, "7", "h4")
    assert "prerank" in degraded(killed)
    assert_priced(killed)
