"""Reload guards: a bundle trained on another feature schema is refused with 422 naming both
schema hashes, in embedded mode (the gateway's /admin/reload) and by a stage service, and
nothing switches. Real stages loaded from tiny_bundle."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from models.bundle import resolve_bundle_dir
from models.features.schema import schema_hash
from services.bench.chaos import variant_bundle
from services.common.config import Settings
from services.common.stage_app import create_stage_app
from services.common.store import MemoryStore
from services.common.store_load import load_marketplace
from services.gateway.app import create_app
from services.gateway.cascade import GatewayConfig
from services.gateway.service import Gateway
from services.gateway.stage_loaders import build_stages, load_stage

API, ADMIN = "reload-frontend-key-01", "reload-admin-key-0123"
SECRET = "reload-token-secret-0123456789abcdef"
SETTINGS = Settings(api_key=API, admin_key=ADMIN, token_secret=SECRET, budget_ms=5000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def other_schema_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
                        ) -> tuple[Path, str, str]:
    """A copy of the tiny bundle whose manifest records another (valid) schema."""
    source = resolve_bundle_dir(tiny_bundle)
    target = tmp_path_factory.mktemp("other-schema") / "v-other"
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    old_sha = manifest["schema_sha256"]
    schema = dict(manifest["schema"])
    schema["version"] = int(schema.get("version", 1)) + 1
    schema["name"] = "another-deployment"
    manifest["schema"], manifest["schema_sha256"] = schema, schema_hash(schema)
    manifest["version"] = "v-other"
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target, old_sha, manifest["schema_sha256"]


@pytest.mark.anyio
async def test_embedded_reload_refuses_another_schema(tiny_data: Path, tiny_bundle: Path,
                                                      other_schema_bundle: Any) -> None:
    other, old_sha, new_sha = other_schema_bundle
    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    gateway = Gateway(SETTINGS, GatewayConfig(), build_stages(SETTINGS, str(tiny_bundle)),
                      store=store)
    await gateway.start(background=False)
    before = {n: c.version for n, c in gateway.stages.all().items()}
    app = create_app(gateway, start=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        reply = await client.post("/admin/reload", headers={"X-API-Key": ADMIN},
                                  json={"bundle": str(other)})
        assert reply.status_code == 422, reply.text
        assert old_sha in reply.text and new_sha in reply.text
        assert {n: c.version for n, c in gateway.stages.all().items()} == before
        # the same bundle again (same schema) still reloads
        reply = await client.post("/admin/reload", headers={"X-API-Key": ADMIN},
                                  json={"bundle": str(tiny_bundle)})
        assert reply.status_code == 200, reply.text
    await gateway.stop()


def test_stage_service_reload_refuses_another_schema(tiny_bundle: Path,
                                                     other_schema_bundle: Any) -> None:
    other, old_sha, new_sha = other_schema_bundle
    app = create_stage_app("prerank", lambda p: load_stage("prerank", p, SETTINGS),
                           bundle=str(tiny_bundle))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        version = client.get("/readyz").json()["version"]
        reply = client.post("/admin/reload", json={"bundle": str(other)})
        assert reply.status_code == 422, reply.text
        assert old_sha in reply.text and new_sha in reply.text
        assert client.get("/readyz").json()["version"] == version


@pytest.mark.anyio
@pytest.mark.parametrize("corrupt", ["din_esmm.safetensors", "faiss.index"])
async def test_corrupt_bundle_is_422_and_no_stage_switches(tiny_data: Path, tiny_bundle: Path,
                                                           tmp_path: Path, corrupt: str) -> None:
    """Finding 4: a bundle whose checksums match but whose safetensors / faiss file is corrupt
    used to answer 500 in embedded mode, after retrieval and prerank had already switched."""
    bad = variant_bundle(tiny_bundle, tmp_path, "v-corrupt", corrupt)
    good = variant_bundle(tiny_bundle, tmp_path, "v-next")
    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    gateway = Gateway(SETTINGS, GatewayConfig(), build_stages(SETTINGS, str(tiny_bundle)),
                      store=store)
    await gateway.start(background=False)
    before = {n: c.version for n, c in gateway.stages.all().items()}
    app = create_app(gateway, start=False)
    admin = {"X-API-Key": ADMIN}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        reply = await client.post("/admin/reload", headers=admin, json={"bundle": str(bad)})
        assert reply.status_code == 422, reply.text
        assert "every stage kept the old bundle" in reply.json()["detail"]
        assert {n: c.version for n, c in gateway.stages.all().items()} == before
        served = await client.post("/v1/ads", headers={"X-API-Key": API}, json={
            "request_id": "after-bad", "user_id": "3", "scene": "home_feed", "slots": 2})
        assert served.status_code == 200 and served.json()["model_version"] == before["rank"]

        reply = await client.post("/admin/reload", headers=admin, json={"bundle": str(good)})
        assert reply.status_code == 200, reply.text
        assert {n: c.version for n, c in gateway.stages.all().items()} == {
            n: "v-next" for n in before}
    await gateway.stop()


def test_stage_service_two_phase_reload(tmp_path: Path) -> None:
    """/admin/reload/prepare loads beside the served state without serving it; commit swaps;
    abort drops; rollback serves the previous state again."""
    def bundle(version: str) -> str:
        path = tmp_path / version
        path.mkdir()
        (path / "manifest.json").write_text(json.dumps({"version": version}))
        return str(path)

    class Versioned:
        def __init__(self, version: str) -> None:
            self.version = version

    def load(path: str) -> Versioned:
        return Versioned(json.loads((Path(path) / "manifest.json").read_text())["version"])

    key = {"X-API-Key": "reload-internal-key-01"}
    app = create_stage_app("prerank", load, bundle=bundle("v1"),
                           internal_key=key["X-API-Key"])
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        version = lambda: client.get("/readyz").json()["version"]  # noqa: E731
        assert client.post("/admin/reload/prepare", json={"bundle": bundle("v2")}).status_code \
            == 401  # the internal key guards every phase
        assert client.post("/admin/reload/prepare", json={"bundle": str(tmp_path / "v2")},
                           headers=key).status_code == 200
        assert version() == "v1"  # prepared, not served
        assert client.post("/admin/reload/abort", headers=key).status_code == 200
        assert client.post("/admin/reload/commit", headers=key).status_code == 409
        client.post("/admin/reload/prepare", json={"bundle": str(tmp_path / "v2")}, headers=key)
        assert client.post("/admin/reload/commit", headers=key).json()["version"] == "v2"
        assert version() == "v2"
        assert client.post("/admin/reload/rollback", headers=key).json()["version"] == "v1"
        assert version() == "v1"


@pytest.mark.anyio
async def test_requests_during_a_reload_are_scored_by_one_bundle(tiny_data: Path,
                                                                 tiny_bundle: Path,
                                                                 tmp_path: Path) -> None:
    """The stages switch one after another; meanwhile the gateway pins its requests to the
    version every stage served before, and a stage that already switched scores such a request
    with the state it kept. After the last commit the pin moves to the new version."""
    from services.common import wire
    from services.gateway.admin import reload_all

    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    gateway = Gateway(SETTINGS, GatewayConfig(), build_stages(SETTINGS, str(tiny_bundle)),
                      store=store)
    await gateway.start(background=False)
    old = gateway.model_version()
    new_bundle = variant_bundle(tiny_bundle, tmp_path, "v-next")
    stages = gateway.stages.all()
    mid_reload: list[tuple[str, str, str]] = []  # (stage, gateway pin, version that scored)

    def pinned_request(name: str) -> wire.WireModel:
        part = dict(request_id="pin", user_id="5", scene="home_feed",
                    model_version=gateway.model_version())
        ids = list(range(1, 40))
        return {"retrieval": wire.RecallRequest(k=20, **part),
                "prerank": wire.PrerankRequest(k=10, ad_ids=ids, **part),
                "rank": wire.RankRequest(ad_ids=ids, **part)}[name]

    for name, client in stages.items():
        async def commit(_name: str = name, _client: Any = client,
                         _commit: Any = client.commit) -> Any:
            result = await _commit()  # this stage now serves the new bundle...
            answer = await _client.call(pinned_request(_name), _deadline())
            mid_reload.append((_name, gateway.model_version(), answer.info.model_version))
            return result

        client.commit = commit
    out = await reload_all(stages, str(new_bundle), gateway.pin_version)
    assert {entry["version"] for entry in out.values()} == {"v-next"} and old != "v-next"
    assert [m[0] for m in mid_reload] == list(stages)
    for name, pin, scored_by in mid_reload:  # ...but requests pinned before score with the old
        assert pin == old and scored_by == old, (name, pin, scored_by)
    assert gateway.model_version() == "v-next"
    for name, client in stages.items():  # pinned to the new one, or not pinned: the new one
        assert (await client.call(pinned_request(name), _deadline())).info.model_version \
            == "v-next"
    answer = await gateway.serve_ads(wire.AdsRequest(request_id="after", user_id="5",
                                                     scene="home_feed", slots=2),
                                     time.monotonic())
    assert answer.model_version == "v-next"
    await gateway.stop()


def _deadline() -> Any:
    from services.common.deadline import Deadline

    return Deadline(time.monotonic() + 30)
