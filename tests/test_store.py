"""The online store: one test body, run on a real Redis and on the in-process store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis

from cli.main import run as cli_run
from models.data import layout
from services.common import store_redis
from services.common.config import Settings
from services.common.store import Ad, Campaign, UserProfile, make_store
from services.common.store_load import load_marketplace
from services.common.store_memory import MemoryStore
from services.common.store_redis import RedisStore

pytestmark = pytest.mark.anyio
DAY = "20240102"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _ad(ad_id: int, **kw: object) -> Ad:
    base = dict(campaign_id=ad_id // 10, advertiser_id=ad_id // 100, category_id=ad_id % 7,
                category_l1=1, brand_id=3, price_micros=9_990_000, price_bucket=4,
                bid_type="cpc", bid_micros=250_000, scenes=("home_feed", "search"),
                creative_id=f"cr-{ad_id}")
    base.update(kw)
    return Ad(ad_id=ad_id, **base)  # type: ignore[arg-type]


async def test_user_context_returns_profile_sequence_and_todays_caps(store) -> None:
    await store.put_users([UserProfile(7, age_bucket=3, gender="female", city_tier=2)])
    await store.push_behaviour(7, ad_id=101, category_id=5)
    await store.push_behaviour(7, ad_id=102, category_id=6)
    await store.incr_cap(7, DAY, campaign_id=10)
    await store.incr_cap(7, DAY, campaign_id=10)
    await store.incr_cap(7, "20240101", campaign_id=11)  # yesterday: not today's cap

    ctx = await store.get_user_context(7, day=DAY)
    assert ctx.known
    assert ctx.profile == {"age_bucket": 3, "gender": "female", "city_tier": 2}
    assert ctx.hist_ad_id == [102, 101]  # newest first
    assert ctx.hist_category_id == [6, 5]
    assert ctx.caps == {10: 2}

    cold = await store.get_user_context("never-seen", day=DAY)
    assert not cold.known and cold.hist_ad_id == [] and cold.caps == {}


async def test_sequence_is_capped_at_50_newest_first(store) -> None:
    assert store.sequence_len == 50
    for i in range(120):
        await store.push_behaviour("u1", ad_id=1000 + i, category_id=i % 9)
    ctx = await store.get_user_context("u1", day=DAY)
    assert ctx.hist_ad_id == [1000 + i for i in range(119, 69, -1)]
    assert ctx.hist_category_id == [i % 9 for i in range(119, 69, -1)]


async def test_counters_are_exact_under_concurrency(store) -> None:
    await asyncio.gather(*(store.incr_spend(5, DAY, 123_457) for _ in range(200)))
    assert await store.incr_spend(5, DAY, 1) == 200 * 123_457 + 1
    assert await store.get_spend([5, 6], DAY) == {5: 200 * 123_457 + 1, 6: 0}
    assert await store.get_spend([5], "20240103") == {5: 0}  # spend is per UTC day

    await asyncio.gather(*(store.incr_qscore(9, impressions=1) for _ in range(100)))
    await store.incr_qscore(9, impressions=0, clicks=3)
    assert await store.get_qscores([9, 10]) == {9: (100, 3), 10: (0, 0)}

    counts = await asyncio.gather(*(store.incr_cap("u", DAY, 77) for _ in range(30)))
    assert sorted(counts) == list(range(1, 31))
    assert await store.incr_cap("u", DAY, 77, n=5) == 35


async def test_duplicate_event_counts_once_within_window(store) -> None:
    assert await store.dedupe_event("e-1", window_s=0.3) is True
    assert await store.dedupe_event("e-1", window_s=0.3) is False
    assert await store.dedupe_event("e-2", window_s=0.3) is True
    await asyncio.sleep(0.45)
    assert await store.dedupe_event("e-1", window_s=0.3) is True  # the window has passed


async def test_catalog_round_trip_admin_edits_and_change_feed(store) -> None:
    await store.put_ads([_ad(i) for i in range(1, 31)])
    await store.put_campaigns([Campaign(c, 0, 5_000_000, "active") for c in range(4)])
    v0 = await store.catalog_version()

    got = await store.get_ads([3, 4, 999])
    assert got == {3: _ad(3), 4: _ad(4)}  # typed records survive the flat hash
    assert sorted(a.ad_id for a in await store.all_ads()) == list(range(1, 31))
    batches = [b async for b in store.iter_ads(batch=7)]
    assert sum(len(b) for b in batches) == 30 and max(len(b) for b in batches) <= 7

    new = _ad(500, bid_type="ocpa", bid_micros=0, target_cpa_micros=4_000_000, scenes=())
    await store.upsert_ad(new)
    assert await store.set_ad_status(3, "paused") is True
    assert await store.set_ad_status(12345, "paused") is False
    assert await store.set_campaign_status(2, "paused") is True
    await store.upsert_campaign(Campaign(9, 1, 7_000_000))
    with pytest.raises(ValueError):
        await store.set_ad_status(4, "deleted")

    assert (await store.get_ads([500]))[500] == new
    assert (await store.get_ads([3]))[3].status == "paused"
    camps = await store.get_campaigns()
    assert sorted(camps) == [0, 1, 2, 3, 9] and camps[2].status == "paused"
    assert await store.get_campaigns([9, 42]) == {9: Campaign(9, 1, 7_000_000)}

    changes = await store.catalog_changes(v0)
    assert changes.version == v0 + 4 and not changes.full_reload
    assert set(changes.ad_ids) == {500, 3} and set(changes.campaign_ids) == {2, 9}
    assert (await store.catalog_changes(changes.version)).ad_ids == ()
    await store.put_ads([_ad(31)])
    assert (await store.catalog_changes(changes.version)).full_reload


async def test_redis_reads_user_context_in_one_round_trip(redis_url, redis_prefix,
                                                          redis_client) -> None:
    sent: list[int] = []

    class CountingConnection(aioredis.Connection):
        """Counts writes to the socket: one per round trip (a pipeline is one write)."""

        async def send_packed_command(self, command, check_health=True):  # type: ignore[override]
            sent.append(1)
            return await super().send_packed_command(command, check_health)

    pool = aioredis.ConnectionPool.from_url(redis_url, decode_responses=True,
                                            connection_class=CountingConnection)
    store = RedisStore(aioredis.Redis(connection_pool=pool), prefix=redis_prefix)
    try:
        await store.put_users([UserProfile(42, 1, "male", 0)])
        await store.push_behaviour(42, 7, 8)
        await store.incr_cap(42, DAY, 3)
        await store.ping()  # connection set-up (HELLO, SETINFO...) happens before counting
        sent.clear()
        ctx = await store.get_user_context(42, day=DAY)
        assert len(sent) == 1
        assert ctx.profile == {"age_bucket": 1, "gender": "male", "city_tier": 0}
        assert ctx.hist_ad_id == [7] and ctx.caps == {3: 1}
    finally:
        await store.close()
    # The keys are the documented ones, under the test's prefix.
    assert redis_client.type(f"{redis_prefix}user:{{42}}") == "hash"
    assert redis_client.lrange(f"{redis_prefix}seq:{{42}}", 0, -1) == ["7:8"]
    assert 0 < redis_client.ttl(f"{redis_prefix}cap:{{42}}:{DAY}") <= 2 * 86_400


async def test_clients_pack_commands_with_hiredis_into_the_same_bytes(redis_url,
                                                                      redis_prefix) -> None:
    """Every client `store_redis.redis_client` makes packs with hiredis (`packed_by_hiredis`),
    and the bytes are those redis-py's own packing writes, for every argument type sent."""
    command = ("XADD", f"{redis_prefix}log", "MAXLEN", "~", 1000, "*", "text", "ü-λ", "int",
               -3, "big", 10**20, "float", 0.1 + 0.2, "tiny", 1e-7, "raw", b"ok\x01",
               "view", memoryview(b"abc"), "inf", float("inf"))
    python_packed = b"".join(aioredis.Connection().pack_command(*command))
    client = store_redis.redis_client(redis_url, max_connections=4)
    plain = store_redis.redis_client(redis_url)
    try:
        for made in (client, plain):
            connection_class = made.connection_pool.connection_class
            assert connection_class.__name__ == "HiredisPackedConnection"
            assert b"".join(connection_class().pack_command(*command)) == python_packed
            assert b"".join(connection_class().pack_command("CONFIG GET", "maxmemory")) == \
                b"".join(aioredis.Connection().pack_command("CONFIG GET", "maxmemory"))
        await client.execute_command(*command)
        entry = (await client.xrange(f"{redis_prefix}log"))[0][1]
        assert entry["text"] == "ü-λ" and entry["big"] == str(10**20)
        assert float(entry["float"]) == 0.1 + 0.2 and entry["view"] == "abc"
        assert entry["raw"] == "ok\x01"
    finally:
        await client.delete(f"{redis_prefix}log")
        await client.aclose()
        await plain.aclose()


async def test_make_store_picks_redis_only_when_url_set(redis_url) -> None:
    assert isinstance(make_store(Settings()), MemoryStore)
    real = make_store(Settings(redis_url=redis_url, redis_prefix="test:mk:"), sequence_len=20)
    try:
        assert isinstance(real, RedisStore) and real.sequence_len == 20
        assert await real.ping()
    finally:
        await real.close()


def write_tiny_marketplace(root: Path) -> Path:
    """A hand-written dataset following models/data/layout.py (3 ads, 2 users, 3 requests)."""
    (root / layout.REQUESTS_DIR).mkdir(parents=True)
    (root / layout.IMPRESSIONS_DIR).mkdir()
    pq.write_table(pa.table({
        "ad_id": [1, 2, 3], "campaign_id": [10, 10, 20], "advertiser_id": [100, 100, 200],
        "category_id": [5, 6, 7], "category_l1": [1, 1, 2], "brand_id": [9, 9, 8],
        "price_micros": [1_000_000] * 3, "price_bucket": [1, 2, 3],
        "bid_type": ["cpc", "cpc", "ocpa"], "bid_micros": [300_000, 200_000, 0],
        "target_cpa_micros": [0, 0, 5_000_000],
        "scenes": [["home_feed"], ["home_feed", "search"], ["product_detail"]],
        "creative_id": ["c1", "c2", "c3"], "status": ["active", "active", "paused"],
    }), root / layout.ADS_FILE)
    pq.write_table(pa.table({"campaign_id": [10, 20], "advertiser_id": [100, 200],
                             "daily_budget_micros": [50_000_000, 9_000_000],
                             "status": ["active", "active"]}), root / layout.CAMPAIGNS_FILE)
    pq.write_table(pa.table({"user_id": [1, 2], "age_bucket": [2, 5],
                             "gender": ["female", "unknown"], "city_tier": [0, 4]}),
                   root / layout.USERS_FILE)
    seq = pa.list_(pa.int64())
    for part, (rid, ts, user, hist_ads, hist_cats) in enumerate([
        (1, 1000, 1, [2], [6]),
        (2, 3000, 1, [3, 2], [7, 6]),  # user 1's latest request: its sequence wins
        (3, 2000, 2, [], []),
    ]):
        pq.write_table(pa.table({
            "request_id": [rid], "ts": [ts], "user_id": [user], "scene": ["home_feed"],
            "hour": [1], "device": ["ios"], "hist_ad_id": pa.array([hist_ads], seq),
            "hist_category_id": pa.array([hist_cats], seq)}),
            root / layout.REQUESTS_DIR / f"part-{part:05d}.parquet")
    pq.write_table(pa.table({
        "request_id": [1], "ts": [1000], "user_id": [1], "scene": ["home_feed"],
        "position": [0], "hour": [1], "device": ["ios"], "ad_id": [2], "click": pa.array(
            [1], pa.int8()), "conversion": pa.array([0], pa.int8()),
        "true_pctr": pa.array([0.1], pa.float32()), "true_pcvr": pa.array([0.02], pa.float32())}),
        root / layout.IMPRESSIONS_DIR / "part-00000.parquet")
    return root


async def test_load_marketplace_fills_catalog_users_and_latest_sequences(store, tmp_path) -> None:
    data = write_tiny_marketplace(tmp_path / "m")
    seen: dict[str, int] = {}
    counts = await load_marketplace(
        store, data, progress=lambda what, n, total: seen.__setitem__(what, seen.get(what, 0) + n))
    assert (counts.ads, counts.campaigns, counts.users, counts.sequences) == (3, 2, 2, 2)
    assert seen == {"ads": 3, "campaigns": 2, "users": 2, "sequences": 2}

    ads = await store.get_ads([1, 2, 3])
    assert ads[3].bid_type == "ocpa" and ads[3].target_cpa_micros == 5_000_000
    assert ads[3].status == "paused" and ads[2].scenes == ("home_feed", "search")
    assert (await store.get_campaigns([20]))[20].daily_budget_micros == 9_000_000
    u1 = await store.get_user_context(1, day=DAY)
    assert u1.profile == {"age_bucket": 2, "gender": "female", "city_tier": 0}
    assert u1.hist_ad_id == [3, 2] and u1.hist_category_id == [7, 6]
    u2 = await store.get_user_context(2, day=DAY)
    assert u2.known and u2.hist_ad_id == []


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        cli_run(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_load_store_cli_fills_redis(redis_url, redis_prefix, redis_client, tmp_path, capsys,
                                    monkeypatch) -> None:
    data = write_tiny_marketplace(tmp_path / "m")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CASCADE_REDIS_PREFIX", redis_prefix)
    code, out, err = _cli(["load-store", "--data", str(data)], capsys)
    assert code == 0, err
    assert "loaded 3 ads, 2 campaigns, 2 users, 2 sequences" in out
    assert redis_client.hget(f"{redis_prefix}ad:3", "status") == "paused"
    assert redis_client.lrange(f"{redis_prefix}seq:{{1}}", 0, -1) == ["3:7", "2:6"]


def test_load_store_cli_errors_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    data = write_tiny_marketplace(tmp_path / "m")
    monkeypatch.delenv("REDIS_URL", raising=False)
    code, _, err = _cli(["load-store", "--data", str(data)], capsys)
    assert code == 2 and "REDIS_URL is not set" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    code, _, err = _cli(["load-store", "--data", str(data)], capsys)
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    code, _, err = _cli(["load-store", "--data", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1



async def test_changed_counters_are_listed_once_moved(store) -> None:
    """Gateways refresh only what moved: counter writes mark their ids with the time."""
    import time

    before = time.time() - 0.001
    await store.incr_qscore(7, impressions=1)
    await store.incr_spend(3, "20261123", 500)
    assert await store.changed_since("qs", before) == [7]
    assert await store.changed_since("spend", before) == [3]
    assert await store.changed_since("qs", time.time() + 1) == []
    with pytest.raises(ValueError, match="unknown counter kind"):
        await store.changed_since("caps", before)
