"""The bundle's K recommendation drives the cascade's cuts, an explicit setting overrides it,
and the recall step's debug output names each candidate's channel."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from models.bundle import publish_recommendation, read_bundle
from services.common import wire
from services.common.config import Settings
from services.common.store import MemoryStore
from services.common.store_load import load_marketplace
from services.gateway.app import create_app
from services.gateway.cascade import DEFAULT_KS, GatewayConfig
from services.gateway.service import Gateway
from services.gateway.stage_loaders import build_stages
from services.retrieval.recall import CHANNELS

SETTINGS = Settings(auth=False, budget_ms=5000)
RECOMMENDED = {"k1": 300, "k2": 150, "k3": 40}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def recommended_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tiny_bundle's root whose `current` carries a K recommendation."""
    root = tmp_path_factory.mktemp("ks_bundles")
    source = read_bundle(tiny_bundle)
    shutil.copytree(source.path, root / source.version, copy_function=os.link)
    (root / "current").symlink_to(source.version)
    path = publish_recommendation(root / source.version, RECOMMENDED, {"measured": "test"})
    assert (root / "current").resolve() == path.resolve()
    return root


def test_recommendation_is_a_new_verified_version(recommended_bundle: Path,
                                                  tiny_bundle: Path) -> None:
    derived, source = read_bundle(recommended_bundle), read_bundle(tiny_bundle)
    assert derived.version != source.version  # the measured bundle itself is not touched
    assert derived.manifest["derived_from"] == source.version
    assert derived.manifest["recommended_ks"] == RECOMMENDED
    assert "recommended_ks" not in json.loads((source.path / "manifest.json").read_text())
    with pytest.raises(ValueError, match="K1 >= K2 >= K3"):
        publish_recommendation(tiny_bundle, {"k1": 10, "k2": 20, "k3": 5}, {})


def test_config_follows_the_bundle_unless_set_explicitly(recommended_bundle: Path) -> None:
    plain = GatewayConfig.for_bundle_path({}, str(recommended_bundle))
    assert (plain.k1, plain.k2, plain.k3) == (300, 150, 40)
    mixed = GatewayConfig.for_bundle_path({"k1": 500}, str(recommended_bundle))
    assert (mixed.k1, mixed.k2, mixed.k3) == (500, 150, 40)
    # set in code to a non-default value: explicit too
    coded = GatewayConfig(k3=25).for_bundle(read_bundle(recommended_bundle).manifest)
    assert (coded.k1, coded.k3) == (300, 25)
    # a bundle without a recommendation keeps the defaults
    assert GatewayConfig().for_bundle({"models": {}}) == GatewayConfig()


async def _serve(tiny_data: Path, bundle: Path, gateway_settings: dict) -> wire.AdsResponse:
    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    config = GatewayConfig.for_bundle_path(gateway_settings, str(bundle))
    gateway = Gateway(SETTINGS, config, build_stages(SETTINGS, str(bundle)), store=store)
    await gateway.start(background=False)
    try:
        return await gateway.serve_ads(wire.AdsRequest(
            request_id="ks", user_id="1", scene="home_feed", slots=2, debug=True))
    finally:
        await gateway.stop()


@pytest.mark.anyio
async def test_the_cascade_cuts_at_the_recommended_ks_and_the_setting_wins(
        tiny_data: Path, recommended_bundle: Path) -> None:
    response = await _serve(tiny_data, recommended_bundle, {})
    stages = {s.name: s for s in response.stages}
    assert stages["recall"].count_out == 300
    assert stages["screen"].count_out <= 150 and stages["prerank"].count_out <= 40
    assert stages["prerank"].count_out == min(40, stages["screen"].count_out)
    debug = {d.name: d for d in response.debug}
    labels = {c.channel for c in debug["recall"].candidates}
    assert labels and labels <= set(CHANNELS)
    overridden = await _serve(tiny_data, recommended_bundle, {"k1": 400})
    assert {s.name: s for s in overridden.stages}["recall"].count_out == 400


@pytest.mark.anyio
async def test_a_reload_follows_the_new_bundles_ks_and_an_explicit_setting_still_wins(
        tiny_data: Path, tiny_bundle: Path, recommended_bundle: Path) -> None:
    """Through the admin route: reloading to a bundle with a recommendation moves the K's that
    were not set explicitly; reloading back to one without moves them back to the defaults."""
    for setting, k1_after in (({}, 300), ({"k1": 400}, 400)):
        store = MemoryStore()
        await load_marketplace(store, tiny_data)
        config = GatewayConfig.for_bundle_path(setting, str(tiny_bundle))
        gateway = Gateway(SETTINGS, config, build_stages(SETTINGS, str(tiny_bundle)),
                          store=store)
        await gateway.start(background=False)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(
                    app=create_app(gateway, start=False)), base_url="http://gw") as client:
                reply = await client.post("/admin/reload", json={"bundle": str(recommended_bundle)})
                assert reply.status_code == 200, reply.text
                assert (gateway.config.k1, gateway.config.k2, gateway.config.k3) == (
                    k1_after, 150, 40)
                response = await gateway.serve_ads(wire.AdsRequest(
                    request_id="ks", user_id="1", scene="home_feed", slots=2))
                assert {s.name: s for s in response.stages}["recall"].count_out == k1_after
                reply = await client.post("/admin/reload", json={"bundle": str(tiny_bundle)})
                assert reply.status_code == 200, reply.text
                assert (gateway.config.k1, gateway.config.k3) == (
                    setting.get("k1", DEFAULT_KS["k1"]), DEFAULT_KS["k3"])
        finally:
            await gateway.stop()
