"""The gateway app in process (ASGI): keys, bad input, events, caps, budgets, admin, served log.

Real stages from tiny_bundle, a real MemoryStore loaded from tiny_data (the Redis variant runs in
tests/test_e2e_gateway.py). The event worker and pacer are driven step by step, so each effect
is asserted exactly, not waited for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.data.dataset import load_encoded_log
from services.common import wire
from services.common.config import Settings
from services.common.store import MemoryStore, utc_day
from services.common.store_load import load_marketplace
from services.gateway.app import create_app
from services.gateway.cascade import GatewayConfig
from services.gateway.served_log import export_training_set
from services.gateway.service import Gateway
from services.gateway.stage_loaders import build_stages, load_stage

API, ADMIN = "frontend-key-0123456", "admin-key-0123456789"
SETTINGS = Settings(api_key=API, admin_key=ADMIN, token_secret="s" * 32, budget_ms=2000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def states(tiny_bundle: Path) -> dict[str, Any]:
    return {n: load_stage(n, str(tiny_bundle), SETTINGS) for n in ("retrieval", "prerank",
                                                                     "rank")}


class RecordingRank:
    """Pass-through to the real rank client that keeps the last RankRequest (a spy, no fake)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.requests = inner, inner.name, []

    async def call(self, request: wire.RankRequest, deadline: Any) -> Any:
        self.requests.append(request)
        return await self.inner.call(request, deadline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def env(tiny_data: Path, tiny_bundle: Path, states: dict[str, Any]):
    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    stages = build_stages(SETTINGS, str(tiny_bundle), states=states)
    stages.rank = RecordingRank(stages.rank)
    gateway = Gateway(SETTINGS, GatewayConfig(freq_cap=1), stages, store=store)
    await gateway.start(background=False)
    app = create_app(gateway, start=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        yield gateway, client


def ads_body(user: str = "1", request_id: str = "r1", **kw: Any) -> dict[str, Any]:
    return {"request_id": request_id, "user_id": user, "scene": "home_feed", "slots": 4, **kw}


async def post_ads(client: httpx.AsyncClient, **kw: Any) -> dict[str, Any]:
    reply = await client.post("/v1/ads", json=ads_body(**kw), headers={"X-API-Key": API})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def post_event(client: httpx.AsyncClient, token: str, kind: str, event_id: str):
    return await client.post("/v1/events", json={"event_id": event_id, "token": token,
                                                 "type": kind}, headers={"X-API-Key": API})


def test_refuses_to_start_without_keys(tiny_bundle: Path, states: dict[str, Any]) -> None:
    settings = Settings(token_secret="s" * 32)
    gateway = Gateway(settings, GatewayConfig(), build_stages(settings, str(tiny_bundle),
                                                              states=states))
    with pytest.raises(ValueError, match="CASCADE_API_KEY.*CASCADE_AUTH=off"):
        create_app(gateway)


@pytest.mark.anyio
async def test_keys(env) -> None:
    _, client = env
    assert (await client.post("/v1/ads", json=ads_body())).status_code == 401
    assert (await client.post("/v1/ads", json=ads_body(),
                              headers={"X-API-Key": "nope"})).status_code == 401
    assert (await client.post("/admin/reload", json={},
                              headers={"X-API-Key": API})).status_code == 403
    assert (await client.post("/admin/campaigns/1/pause")).status_code == 401
    assert (await client.get("/healthz")).status_code == 200


@pytest.mark.anyio
async def test_bad_input_is_a_4xx_naming_the_problem_and_writes_nothing(env) -> None:
    gateway, client = env
    headers = {"X-API-Key": API}
    cases = [
        ({k: v for k, v in ads_body().items() if k != "scene"}, 422, "scene"),
        (ads_body(scene="moon_feed"), 422, "scene"),
        (ads_body(slots=10_000), 422, "slots"),
        (ads_body(slots=7, scene="product_detail"), 422, "slots"),
    ]
    for body, status, field in cases:
        reply = await client.post("/v1/ads", json=body, headers=headers)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["field"] == field and field in str(reply.json()["detail"])
    big = b'{"request_id": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    reply = await client.post("/v1/ads", content=big, headers={**headers,
                                                               "Content-Type": "application/json"})
    assert reply.status_code == 413 and "too large" in reply.json()["detail"]
    served = await post_ads(client)
    token = served["slots"][0]["token"]
    payload, _, _ = token.partition(".")
    forged = payload + "." + "A" * 43
    reply = await post_event(client, forged, "click", "e-forged")
    assert reply.status_code == 422 and "forged" in reply.json()["detail"]
    reply = await post_event(client, "garbage", "click", "e-bad")
    assert reply.status_code == 422 and "token" in reply.json()["detail"]
    reply = await client.post("/v1/events", json={"event_id": "e1", "token": token,
                                                  "type": "like"}, headers=headers)
    assert reply.status_code == 422 and reply.json()["field"] == "type"
    await gateway.flush()
    assert await gateway.events.length() == 0  # only rejected events so far
    assert await gateway.served.length() == len(served["slots"])  # only the good request


@pytest.mark.anyio
async def test_protobuf_request_and_response(env) -> None:
    _, client = env
    body = wire.encode(wire.AdsRequest(**ads_body()), wire.PROTOBUF)
    reply = await client.post("/v1/ads", content=body, headers={
        "X-API-Key": API, "Content-Type": wire.PROTOBUF})
    assert reply.status_code == 200 and reply.headers["content-type"] == wire.PROTOBUF
    decoded = wire.decode(wire.AdsResponse, reply.content, wire.PROTOBUF)
    assert decoded.slots and decoded.request_id == "r1"


@pytest.mark.anyio
async def test_events_count_once_and_the_frequency_cap_stops_a_campaign(env) -> None:
    gateway, client = env
    first = await post_ads(client, user="7", request_id="a")
    slot = first["slots"][0]
    for _ in range(2):  # the same event id twice
        reply = await post_event(client, slot["token"], "impression", "imp-1")
        assert reply.status_code == 200
    assert reply.json()["duplicate"] is True
    assert await gateway.worker.process_batch() == 1
    assert (await gateway.store.get_qscores([slot["ad_id"]]))[slot["ad_id"]][0] == 1
    context = await gateway.store.get_user_context("7", utc_day())
    assert context.caps == {slot["campaign_id"]: 1}
    for i in range(3):  # freq_cap=1: the campaign is gone for this user today
        again = await post_ads(client, user="7", request_id=f"b{i}")
        assert slot["campaign_id"] not in {s["campaign_id"] for s in again["slots"]}


@pytest.mark.anyio
async def test_a_click_changes_the_next_ranking_input(env) -> None:
    gateway, client = env
    served = await post_ads(client, user="9", request_id="c1")
    slot = served["slots"][0]
    assert (await post_event(client, slot["token"], "click", "click-1")).status_code == 200
    await gateway.worker.process_batch()
    context = await gateway.store.get_user_context("9")
    assert context.hist_ad_id[0] == slot["ad_id"]
    await post_ads(client, user="9", request_id="c2")
    hist = gateway.stages.rank.requests[-1].hist["hist_ad_id"].ints
    assert int(hist[0]) == slot["ad_id"]


@pytest.mark.anyio
async def test_a_spent_budget_stops_delivery(env) -> None:
    gateway, client = env
    served = await post_ads(client, user="11", request_id="s1")
    slot = served["slots"][0]
    reply = await client.patch(f"/admin/campaigns/{slot['campaign_id']}",
                               json={"daily_budget_micros": slot["price_micros"]},
                               headers={"X-API-Key": ADMIN})
    assert reply.status_code == 200, reply.text
    await post_event(client, slot["token"], "click", "spend-1")
    await gateway.worker.process_batch()
    await gateway.pacer.refresh()
    spend = await gateway.store.get_spend([slot["campaign_id"]], utc_day())
    assert spend[slot["campaign_id"]] == slot["price_micros"]
    for i in range(5):
        again = await post_ads(client, user=str(20 + i), request_id=f"s2{i}")
        assert slot["campaign_id"] not in {s["campaign_id"] for s in again["slots"]}


@pytest.mark.anyio
async def test_a_new_ad_serves_at_once_and_a_paused_one_stops(env) -> None:
    gateway, client = env
    admin = {"X-API-Key": ADMIN}
    reply = await client.post("/admin/campaigns", json={
        "campaign_id": 990_001, "advertiser_id": 5, "daily_budget_micros": 10**12}, headers=admin)
    assert reply.status_code == 200, reply.text
    ad = {"ad_id": 990_001, "campaign_id": 990_001, "advertiser_id": 5, "category_id": 3,
          "brand_id": 2, "price_bucket": 4, "bid_type": "cpc", "bid_micros": 200_000_000,
          "scenes": ["home_feed"], "creative_id": "new-creative"}
    bad = await client.post("/admin/ads", json={**ad, "campaign_id": 123_456_789}, headers=admin)
    assert bad.status_code == 422 and bad.json()["field"] == "campaign_id"
    reply = await client.post("/admin/ads", json=ad, headers=admin)
    assert reply.status_code == 200 and reply.json()["created"], reply.text
    served = await post_ads(client, user="new-visitor", request_id="n1")
    assert served["slots"][0]["ad_id"] == 990_001
    assert served["slots"][0]["creative_id"] == "new-creative"
    assert (await client.post("/admin/ads/990001/pause", headers=admin)).status_code == 200
    served = await post_ads(client, user="new-visitor", request_id="n2")
    assert 990_001 not in {s["ad_id"] for s in served["slots"]}


@pytest.mark.anyio
async def test_served_traffic_exports_a_trainable_dataset(env, tmp_path: Path) -> None:
    gateway, client = env
    slots = []
    for i in range(6):
        slots += (await post_ads(client, user=str(30 + i), request_id=f"x{i}"))["slots"]
    await post_event(client, slots[0]["token"], "click", "x-click")
    await gateway.worker.process_batch()
    await gateway.flush()
    summary = await export_training_set(gateway.sources(), tmp_path / "served")
    assert summary["impressions"] == len(slots)
    log = load_encoded_log(tmp_path / "served")
    assert len(log) == len(slots)
    assert int(log.click.sum()) == 1
    clicked = int(log.ad_id[log.click > 0][0])
    assert clicked == slots[0]["ad_id"]
    assert time.time() * 1000 - int(log.ts.max()) < 600_000


class GatedRank(RecordingRank):
    """The real rank client behind a gate the test opens: a request holds its place in flight
    for as long as the test wants (no fake scores: the real ranker answers)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        import asyncio

        self.gate = asyncio.Event()

    async def call(self, request: wire.RankRequest, deadline: Any) -> Any:
        await self.gate.wait()
        return await super().call(request, deadline)


@pytest.mark.anyio
async def test_overload_is_shed_with_503_and_nothing_is_served(env) -> None:
    """At the in-flight bound the next request is a 503 with Retry-After, at once, before any
    work (nothing logged as served); once the queue drains requests are answered again."""
    import asyncio

    from services.common.admission import Admission, AdmissionConfig
    from services.gateway.served_log import _all

    gateway, client = env
    knobs = gateway.admission["/v1/ads"].config  # from the settings' default budget (2 s)
    assert (knobs.target_ms, knobs.max_wait_ms) == pytest.approx((1600.0, 1200.0))
    gated = GatedRank(gateway.stages.rank.inner)
    gateway.cascade.rank = gated
    gate = gateway.admission["/v1/ads"]
    one = Admission(AdmissionConfig(initial_limit=1, min_limit=1, max_limit=1,
                                    max_wait_ms=10_000))
    gate.__dict__.update(one.__dict__)  # the app's middleware holds this very object
    first = asyncio.create_task(post_ads(client, request_id="held"))
    while gate.in_flight == 0:
        await asyncio.sleep(0.005)
    await gateway.flush()
    served_before = len(await _all(gateway.served))
    started = time.perf_counter()
    shed = await client.post("/v1/ads", json=ads_body(request_id="shed"),
                             headers={"X-API-Key": API})
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert "overloaded" in shed.json()["detail"]
    assert time.perf_counter() - started < 0.5  # answered without waiting for the held one
    gated.gate.set()
    held = await first
    assert held["slots"] and not held["degraded"]
    await gateway.flush()
    served = await _all(gateway.served)
    assert len(served) - served_before == len(held["slots"])  # the shed request left no trace
    assert all("shed" not in str(r) for r in served)
    again = await post_ads(client, request_id="after")
    assert again["slots"]
    assert gate.shed == 1 and gate.in_flight == 0


@pytest.mark.anyio
async def test_admin_writes_take_no_slow_path_and_stay_off_the_event_loop(env) -> None:
    """A new campaign, a new ad and a budget change: applied to the catalog in a worker thread
    (never on the event loop), visible to the next request, and the requests after them
    run the same vectorised pacing and screening: no per-campaign fallback is ever taken."""
    import threading

    from services.gateway.pacing import Pacer

    gateway, client = env
    admin = {"X-API-Key": ADMIN}
    loop_thread = threading.get_ident()
    applied_on: list[int] = []
    for name in ("apply_ads", "apply_campaigns"):
        original = getattr(gateway.catalog, name)

        def spy(items, _original=original):
            applied_on.append(threading.get_ident())
            return _original(items)

        setattr(gateway.catalog, name, spy)
    scalar_calls: list[int] = []
    original_probability = Pacer.probability

    def probability(self, *args, **kwargs):
        scalar_calls.append(1)
        return original_probability(self, *args, **kwargs)

    Pacer.probability = probability  # the per-campaign path: requests must never take it
    try:
        view_before = gateway.catalog.view
        assert (await client.post("/admin/campaigns", json={
            "campaign_id": 990_001, "daily_budget_micros": 10**12}, headers=admin)
        ).status_code == 200
        reply = await client.post("/admin/ads", json={
            "ad_id": 990_001, "campaign_id": 990_001, "category_id": 3, "bid_micros": 10**9,
            "scenes": ["home_feed"], "creative_id": "fresh"}, headers=admin)
        assert reply.status_code == 200, reply.text
        assert (await client.patch("/admin/campaigns/990001", json={
            "daily_budget_micros": 2 * 10**12}, headers=admin)).status_code == 200
        assert applied_on and loop_thread not in applied_on
        assert 990_001 in gateway.catalog and gateway.catalog.has_campaign(990_001)
        for i in range(3):
            body = await post_ads(client, user=str(i + 2), request_id=f"after-admin-{i}")
            assert not body["degraded"]
        assert scalar_calls == []
        # known rows were edited in place; only new rows swapped in a new view
        assert gateway.catalog.view.ads.records is view_before.ads.records or \
            gateway.catalog.view.n_ads == view_before.n_ads + 1
    finally:
        Pacer.probability = original_probability


@pytest.mark.anyio
async def test_screening_drops_are_reported_per_rule_and_counted_in_metrics(env) -> None:
    gateway, client = env
    first = await post_ads(client, user="3", request_id="drops-0", debug=True)
    recalled = next(d for d in first["debug"] if d["name"] == "recall")["candidates"]
    view = gateway.catalog.view
    known = [view.ad_index.get(c["ad_id"]) for c in recalled]  # (stages outlive this catalog)
    campaign = int(view.ads.campaign_id[next(r for r in known if r is not None)])
    reply = await client.post(f"/admin/campaigns/{campaign}/pause", headers={"X-API-Key": ADMIN})
    assert reply.status_code == 200
    body = await post_ads(client, user="3", request_id="drops")
    screen = next(s for s in body["stages"] if s["name"] == "screen")
    assert screen["dropped"].get("campaign_paused", 0) >= 1  # recall does not know campaigns
    assert all(v > 0 for v in screen["dropped"].values())
    assert screen["count_in"] - sum(screen["dropped"].values()) >= screen["count_out"]
    metrics = (await client.get("/metrics")).text
    for reason, count in screen["dropped"].items():
        line = f'cascade_gateway_screen_dropped_total{{reason="{reason}"}}'
        assert line in metrics
        assert float(metrics.split(line)[1].split()[0]) >= count
