"""Stateless stages: a stage process started after ads were added through the store serves
them without any push, and picks up later changes by polling the catalog version.

Real processes (`cascade serve <stage>` under uvicorn) over real HTTP, on a real Redis and on a
real Redis Cluster. Nothing is pushed to the stages (no POST /admin/ads): what they serve of
the new ads they read from Redis themselves.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from services.common import wire
from services.common.store import Ad
from services.common.store_load import load_marketplace
from services.common.store_redis import RedisStore
from services.stack.launcher import free_port
from tests.fixtures_redis import prefix_for
from tests.test_faults import wait_until

pytestmark = pytest.mark.slow
KEY = "catchup-internal-key-0123456"
HEADERS = {"X-API-Key": KEY}


@contextmanager
def stage_process(role: str, bundle: Path, redis_url: str, prefix: str) -> Iterator[str]:
    """`cascade serve <role>` following the catalog in Redis; its base URL once ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CASCADE_") and k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, CASCADE_REDIS_PREFIX=prefix, CASCADE_INTERNAL_KEY=KEY,
               CASCADE_CATALOG_POLL_S="0.2", CASCADE_TORCH_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", role, "--bundle",
                             str(bundle), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{role} exited: {proc.stderr.read()}"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{role} not ready in 120 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def new_ad(ad_id: int, status: str = "active") -> Ad:
    return Ad(ad_id=ad_id, campaign_id=1, advertiser_id=1, category_id=3, brand_id=2,
              price_bucket=4, bid_type="cpc", bid_micros=50_000_000,
              scenes=("search",), creative_id="c-new", status=status)


def write(url: str, prefix: str, *, data: Path | None = None, ads: list[Ad] = (),
          pause: int | None = None) -> None:
    """Change the store the way /admin and load-store do (never touching a stage)."""
    async def run() -> None:
        store = RedisStore.from_url(url, prefix=prefix)
        try:
            if data is not None:
                await load_marketplace(store, data)
            for ad in ads:
                await store.upsert_ad(ad)
            if pause is not None:
                assert await store.set_ad_status(pause, "paused")
        finally:
            await store.close()
    asyncio.run(run())


def recalled(url: str, k: int) -> set[int]:
    """The ads retrieval returns for a user-less `search` request (the cold-start channel)."""
    reply = httpx.post(url + "/v1/recall", headers=HEADERS, timeout=10,
                       json={"scene": "search", "k": k})
    assert reply.status_code == 200, reply.text
    return set(wire.decode(wire.RecallResponse, reply.content).ad_ids.tolist())


@pytest.fixture
def catalog_size(tiny_bundle: Path) -> int:
    return pq.read_metadata(tiny_bundle / "current" / "catalog.parquet").num_rows


def test_fresh_retrieval_serves_ads_added_before_it_started_and_follows_later_changes(
        any_redis_url: str, request: pytest.FixtureRequest, tiny_data: Path, tiny_bundle: Path,
        catalog_size: int) -> None:
    url = any_redis_url  # one Redis, then the 3-master cluster
    prefix = prefix_for(request, url)
    first, second = 10**9 + 1, 10**9 + 2
    write(url, prefix, data=tiny_data, ads=[new_ad(first)])  # bulk load, then an /admin-style add
    with stage_process("retrieval", tiny_bundle, url, prefix) as stage:
        k = catalog_size + 10  # every eligible ad comes back
        assert first in recalled(stage, k)  # caught up at start, with no push
        body = httpx.get(stage + "/readyz", timeout=5).json()
        assert body["catalog"]["applied"] == 1 and body["catalog"]["refused"] == 0, body
        write(url, prefix, ads=[new_ad(second)], pause=first)  # while it runs: polled
        assert wait_until(lambda: second in recalled(stage, k)), "new ad never served"
        assert wait_until(lambda: first not in recalled(stage, k)), "paused ad still served"


def test_fresh_prerank_scores_an_ad_added_before_it_started(
        redis_url: str, redis_prefix: str, tiny_data: Path, tiny_bundle: Path) -> None:
    ad_id = 10**9 + 3
    write(redis_url, redis_prefix, data=tiny_data, ads=[new_ad(ad_id)])
    with stage_process("prerank", tiny_bundle, redis_url, redis_prefix) as stage:
        reply = httpx.post(stage + "/v1/prerank", headers=HEADERS, timeout=10,
                           json={"scene": "search", "k": 10, "ad_ids": [ad_id, 10**15]})
        assert reply.status_code == 200, reply.text
        got = wire.decode(wire.PrerankResponse, reply.content).ad_ids.tolist()
        assert got == [ad_id]  # known now; the never-added id is dropped
