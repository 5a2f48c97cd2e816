"""The cascade with real stage states (tiny_bundle), and its fallbacks when a stage hangs or fails.

Fakes stand in for a stage ONLY to hang far past the budget or to raise; everything else (store,
catalog, Qscore, pacing, auction, tokens) is real.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.common import wire
from services.common.config import Settings
from services.common.store import MemoryStore
from services.common.store_load import load_marketplace
from services.gateway.cascade import GatewayConfig
from services.gateway.service import Gateway
from services.gateway.stage_loaders import build_stages, load_stage

SETTINGS = Settings(auth=False, budget_ms=2000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def stage_states(tiny_bundle: Path) -> dict[str, Any]:
    """Each stage loaded once per module from the shared bundle."""
    return {name: load_stage(name, str(tiny_bundle), SETTINGS)
            for name in ("retrieval", "prerank", "rank")}


class HangingStage:
    """A stage that answers after 30 s: far past any request budget."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def call(self, request: Any, deadline: Any) -> Any:
        await asyncio.sleep(30)
        raise AssertionError("the cascade should have stopped waiting")

    async def update(self, update: Any) -> None:
        return None

    async def reload(self, bundle: Any) -> Any:
        raise RuntimeError("no reload")

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class FailingStage(HangingStage):
    """A stage that raises at once."""

    async def call(self, request: Any, deadline: Any) -> Any:
        raise ConnectionError(f"{self.name} is down")


async def _gateway(tiny_data: Path, tiny_bundle: Path, states: dict[str, Any],
                   **replace: Any) -> Gateway:
    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    stages = build_stages(SETTINGS, str(tiny_bundle), states=states)
    for name, client in replace.items():
        setattr(stages, name, client)
    gateway = Gateway(SETTINGS, GatewayConfig(), stages, store=store)
    await gateway.start(background=False)
    return gateway


def _request(user: str = "1", **kw: Any) -> wire.AdsRequest:
    return wire.AdsRequest(request_id=kw.pop("request_id", "r1"), user_id=user,
                           scene=kw.pop("scene", "home_feed"), slots=kw.pop("slots", 4), **kw)


def _stage(response: wire.AdsResponse, name: str) -> wire.StageReport:
    return next(s for s in response.stages if s.name == name)


async def _assert_priced(gateway: Gateway, response: wire.AdsResponse) -> None:
    assert response.slots, "expected a filled slate"
    campaigns = [s.campaign_id for s in response.slots]
    assert len(set(campaigns)) == len(campaigns), "one ad per campaign"
    ecpms = [s.ecpm for s in response.slots]
    assert ecpms == sorted(ecpms, reverse=True)
    for slot in response.slots:
        ad = (await gateway.store.get_ads([slot.ad_id]))[slot.ad_id]  # the stored truth
        assert ad.status == "active" and "home_feed" in ad.scenes
        bid = ad.bid_micros if ad.bid_type == "cpc" else ad.target_cpa_micros * slot.pcvr
        assert 1 <= slot.price_micros <= bid + 1e-6
        claims = gateway.signer.verify(slot.token, time.time())
        assert (claims.ad_id, claims.price_micros) == (slot.ad_id, slot.price_micros)


@pytest.mark.anyio
async def test_full_cascade_ranks_prices_and_reports_every_step(
        tiny_data: Path, tiny_bundle: Path, stage_states: dict[str, Any]) -> None:
    gateway = await _gateway(tiny_data, tiny_bundle, stage_states)
    response = await gateway.serve_ads(_request(debug=True))
    assert [s.name for s in response.stages] == ["features", "recall", "screen", "prerank",
                                                 "rank", "auction"]
    assert not response.degraded, [s.reason for s in response.stages if s.degraded]
    assert _stage(response, "recall").count_out > 200
    assert _stage(response, "prerank").count_out == 200
    assert _stage(response, "rank").count_in == 200
    assert _stage(response, "features").count_out == 1  # a known user
    assert {d.name for d in response.debug} >= {"recall", "prerank", "rank"}
    assert all(d.candidates for d in response.debug if d.name != "features")
    await _assert_priced(gateway, response)
    await gateway.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("broken", ["retrieval", "prerank", "rank"])
async def test_a_hanging_stage_is_skipped_within_the_budget(
        broken: str, tiny_data: Path, tiny_bundle: Path, stage_states: dict[str, Any]) -> None:
    gateway = await _gateway(tiny_data, tiny_bundle, stage_states,
                             **{broken: HangingStage(broken)})
    started = time.monotonic()
    response = await gateway.serve_ads(_request(budget_ms=300))
    assert time.monotonic() - started < 5.0  # the hang would take 30 s
    step = "recall" if broken == "retrieval" else broken
    degraded = [s.name for s in response.stages if s.degraded]
    assert degraded == [step]
    assert "deadline" in _stage(response, step).reason
    assert response.degraded
    await _assert_priced(gateway, response)
    await gateway.stop()


@pytest.mark.anyio
async def test_every_stage_failing_still_answers_from_qscore(
        tiny_data: Path, tiny_bundle: Path, stage_states: dict[str, Any]) -> None:
    gateway = await _gateway(tiny_data, tiny_bundle, stage_states,
                             retrieval=FailingStage("retrieval"), prerank=FailingStage("prerank"),
                             rank=FailingStage("rank"))
    response = await gateway.serve_ads(_request())
    assert {s.name for s in response.stages if s.degraded} == {"recall", "prerank", "rank"}
    assert "ConnectionError" in _stage(response, "rank").reason
    # the local cold-start channel screens the whole catalog by the Qscore estimate
    assert _stage(response, "screen").count_out > 0
    await _assert_priced(gateway, response)
    await gateway.stop()


@pytest.mark.anyio
async def test_unknown_user_takes_the_cold_start_path(
        tiny_data: Path, tiny_bundle: Path, stage_states: dict[str, Any]) -> None:
    gateway = await _gateway(tiny_data, tiny_bundle, stage_states)
    response = await gateway.serve_ads(_request(user="no-such-user-xyz"))
    assert _stage(response, "features").count_out == 0
    assert not response.degraded
    await _assert_priced(gateway, response)
    await gateway.stop()


@pytest.mark.anyio
async def test_the_fallback_pool_is_made_at_start_and_never_per_request(
        tiny_data: Path, tiny_bundle: Path, stage_states: dict[str, Any]) -> None:
    """Retrieval failing for many requests at once: the scene's pool was computed at start,
    and a stale one (the catalog changed) is served at once while ONE refresh runs."""
    gateway = await _gateway(tiny_data, tiny_bundle, stage_states,
                             retrieval=FailingStage("retrieval"))
    cascade = gateway.cascade
    computed: list[str] = []
    release = threading.Event()
    compute = cascade._compute_fallback

    def held_compute(scene: str) -> Any:  # a scan that lasts until the test lets it end
        computed.append(scene)
        release.wait(10)
        return compute(scene)

    cascade._compute_fallback = held_compute  # type: ignore[method-assign]
    responses = await asyncio.gather(*(gateway.serve_ads(_request(request_id=f"r{i}"))
                                       for i in range(20)))
    assert computed == []  # made by the warm-up, fresh
    assert all(_stage(r, "screen").count_out > 0 for r in responses)

    gateway.catalog.version += 1  # an admin write: every pool is stale now
    responses = await asyncio.gather(*(gateway.serve_ads(_request(request_id=f"s{i}"))
                                       for i in range(20)))
    # all answered from the stale pool while the one refresh is still held
    assert computed == ["home_feed"] and not release.is_set()
    assert all(_stage(r, "screen").count_out > 0 for r in responses)
    release.set()
    for _ in range(100):
        if not cascade._fallback_refresh:
            break
        await asyncio.sleep(0.05)
    await gateway.serve_ads(_request(request_id="t"))
    assert computed == ["home_feed"]  # the refreshed pool is fresh again
    await gateway.stop()
