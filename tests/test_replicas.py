"""A stage's replicas behind one HttpStage: the URL setting, DNS names, least-in-flight spread,
a breaker per replica (a stopped replica is skipped, all stopped -> StageSkipped) and catalog
updates reaching every replica. The slow test runs two real prerank processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from services.common import wire
from services.common.deadline import Deadline
from services.gateway.breaker import CLOSED, OPEN, BreakerConfig
from services.gateway.clients import HttpStage, StageSkipped, pick_addresses, replica_urls
from services.stack.launcher import free_port
from tests.test_e2e_gateway import _wait_ready as wait_all_ready

INTERNAL = "replicas-internal-key-01"


def test_a_stage_setting_lists_replicas() -> None:
    assert replica_urls("http://a:1") == ["http://a:1"]
    assert replica_urls(" http://a:1/, http://b:2 ,") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="no URL"):
        replica_urls(" , ")


def test_localhost_resolves_to_the_ipv4_replica_only() -> None:
    infos = socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    assert pick_addresses(infos) == ["127.0.0.1"]
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0))]
    assert pick_addresses(v6) == ["::1"]  # an IPv6-only cluster still resolves


@pytest.mark.anyio
async def test_names_are_resolved_to_one_replica_per_address_and_ips_kept() -> None:
    stage = HttpStage("rank", "http://localhost:8003,http://10.0.0.7:8003", "/v1/rank",
                      wire.RankResponse)
    try:
        assert [r.url for r in stage.replicas] == ["http://127.0.0.1:8003",
                                                   "http://10.0.0.7:8003"]
        await stage.refresh()  # the same answer: the same replica objects, breakers kept
        assert len(stage.replicas) == 2 and stage.breaker.state == CLOSED
    finally:
        await stage.close()


def _start_prerank(bundle: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_INTERNAL_KEY=INTERNAL, CASCADE_TORCH_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "prerank", "--bundle",
                             str(bundle), "--port", str(port)], env=env,
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(procs: list[subprocess.Popen], urls: list[str]) -> None:
    wait_all_ready(list(zip(procs, urls, strict=True)))


def _served(url: str) -> float:
    """Pre-rank requests this replica answered 200 (its own /metrics)."""
    text = httpx.get(url + "/metrics", headers={"X-API-Key": INTERNAL}, timeout=2).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cascade_responses_total{") and 'status="200"' in line
               and "prerank" in line.split("endpoint=", 1)[1])


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_replicas_share_calls_skip_a_stopped_one_and_both_get_updates(
        tiny_bundle: Path) -> None:
    started = [_start_prerank(tiny_bundle) for _ in range(2)]
    procs, urls = [p for p, _ in started], [u for _, u in started]
    stage = HttpStage("prerank", ",".join(urls), "/v1/prerank", wire.PrerankResponse,
                      admin_key=INTERNAL, breaker=BreakerConfig(failures=2, open_s=30.0))
    catalog = pq.read_table(f"{tiny_bundle}/current/catalog.parquet").to_pylist()
    ad_ids = [row["ad_id"] for row in catalog[:50]]
    request = wire.PrerankRequest(scene="search", k=10, ad_ids=ad_ids)
    try:
        _wait_ready(procs, urls)
        # concurrent calls: least-in-flight sends them to both replicas
        answers = await asyncio.gather(*(stage.call(request, Deadline.after_ms(5000))
                                         for _ in range(40)))
        assert all(len(a.ad_ids) == 10 for a in answers)
        served = [_served(u) for u in urls]
        assert sum(served) == 40 and min(served) >= 10, served

        # a new ad pushed once reaches every replica
        new_id = max(row["ad_id"] for row in catalog) + 1000
        features = {k: catalog[0][k] for k in ("campaign_id", "advertiser_id", "category_id",
                                               "brand_id", "price_bucket", "bid_type")
                    if k in catalog[0]}
        answer = await stage.update(wire.CatalogUpdate(ad_id=new_id, scenes=["search"],
                                                       features={"ad_id": new_id, **features}))
        assert answer is not None and answer.added
        for url in urls:
            one = HttpStage("prerank", url, "/v1/prerank", wire.PrerankResponse,
                            admin_key=INTERNAL)
            try:
                got = await one.call(wire.PrerankRequest(scene="search", k=5, ad_ids=[new_id]),
                                     Deadline.after_ms(5000))
            finally:
                await one.close()
            assert got.ad_ids == [new_id], url

        # replica 0 stops: after its breaker opens every call goes to replica 1, without waiting
        os.kill(procs[0].pid, signal.SIGSTOP)
        failures = 0
        for _ in range(12):
            try:
                await stage.call(request, Deadline.after_ms(150))
            except Exception:  # noqa: BLE001 - the timeouts that open replica 0's breaker
                failures += 1
        assert failures <= 2
        assert stage.breaker.states()[f"prerank@{urls[0]}"] == OPEN
        assert stage.breaker.state == CLOSED  # the stage as a whole still serves
        before = _served(urls[1])
        t0 = time.perf_counter()
        for _ in range(10):
            assert len((await stage.call(request, Deadline.after_ms(2000))).ad_ids) == 10
        assert _served(urls[1]) - before == 10
        assert (time.perf_counter() - t0) / 10 < 0.1

        # both stopped: skipped at once, the cascade's fallback applies
        os.kill(procs[1].pid, signal.SIGSTOP)
        for _ in range(3):
            with pytest.raises(Exception):  # noqa: B017 - timeouts open replica 1's breaker
                await stage.call(request, Deadline.after_ms(150))
            if stage.breaker.state == OPEN:
                break
        assert stage.breaker.state == OPEN
        t0 = time.perf_counter()
        with pytest.raises(StageSkipped, match="all 2 replica"):
            await stage.call(request, Deadline.after_ms(150))
        assert time.perf_counter() - t0 < 0.01
    finally:
        await stage.close()
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_new_dns_answer_adds_and_retires_replicas_keeping_known_breakers() -> None:
    stage = HttpStage("rank", "http://10.0.0.1:8003,http://10.0.0.2:8003", "/v1/rank",
                      wire.RankResponse, breaker=BreakerConfig(failures=1, open_s=60.0))
    try:
        first, second = stage.replicas
        second.breaker.before_call()
        second.breaker.failure()  # open
        # what a re-resolution applies when a pod left and another arrived
        stage._apply(["http://10.0.0.2:8003", "http://10.0.0.3:8003"])
        assert [r.url for r in stage.replicas] == ["http://10.0.0.2:8003",
                                                   "http://10.0.0.3:8003"]
        assert stage.replicas[0] is second and second.breaker.state == OPEN
        assert stage._retired == [first]
        await stage.refresh()  # an idle retired replica's connections are closed
        assert stage._retired == [] and first.client.is_closed
        # the open replica is skipped: the call goes to the new one
        assert stage._pick() is stage.replicas[1]
    finally:
        await stage.close()
