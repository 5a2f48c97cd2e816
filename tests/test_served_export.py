"""/admin/export on served traffic: any frontend user id exports, ids never merge, and the
export writes only under the configured export directory. The gateway app in process (ASGI)
with real stages from tiny_bundle and a real MemoryStore."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from services.common.config import Settings
from services.common.store import MemoryStore
from services.common.store_load import load_marketplace
from services.gateway.app import create_app
from services.gateway.cascade import GatewayConfig
from services.gateway.served_log import HASHED_ID_BIT, int_id
from services.gateway.service import Gateway
from services.gateway.stage_loaders import build_stages, load_stage

API, ADMIN = "export-frontend-key-01", "export-admin-key-0123"
SECRET = "export-token-secret-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def export_env(tiny_data: Path, tiny_bundle: Path, tmp_path: Path):
    settings = Settings(api_key=API, admin_key=ADMIN, token_secret=SECRET, budget_ms=5000,
                        export_dir=str(tmp_path / "exports"))
    store = MemoryStore()
    await load_marketplace(store, tiny_data)
    states = {n: load_stage(n, str(tiny_bundle), settings)
              for n in ("retrieval", "prerank", "rank")}
    gateway = Gateway(settings, GatewayConfig(), build_stages(settings, str(tiny_bundle),
                                                              states=states), store=store)
    await gateway.start(background=False)
    app = create_app(gateway, start=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        yield gateway, client, tmp_path


def test_int_id_keeps_ascii_decimals_and_hashes_everything_else() -> None:
    assert int_id("42") == 42 and int_id("0") == 0
    for text in ("²", "٤٢", "abc", "42 ", "-1", "9" * 19):
        value = int_id(text)
        assert value & HASHED_ID_BIT and 0 < value < 2**62, text
    assert int_id("٤٢") != int_id("42")
    assert int_id("²") == int_id("²")  # stable


@pytest.mark.anyio
async def test_export_survives_unicode_digit_user_ids_and_keeps_them_apart(
        export_env: Any) -> None:
    """Finding 6: user ids "²" and "٤٢" used to break the export (int("²")) or merge with 42."""
    gateway, client, tmp_path = export_env
    for i, user in enumerate(["²", "٤٢", "42"]):
        reply = await client.post("/v1/ads", headers={"X-API-Key": API}, json={
            "request_id": f"u{i}", "user_id": user, "scene": "home_feed", "slots": 2})
        assert reply.status_code == 200 and reply.json()["slots"], reply.text
    await gateway.flush()
    reply = await client.post("/admin/export", headers={"X-API-Key": ADMIN},
                              json={"out": "served"})
    assert reply.status_code == 200, reply.text
    users = pq.read_table(tmp_path / "exports" / "served" / "users.parquet")
    ids = set(users.column("user_id").to_pylist())
    assert len(ids) == 3 and 42 in ids
    assert {int_id("²"), int_id("٤٢")} <= ids


@pytest.mark.anyio
@pytest.mark.parametrize("out", ["/tmp/cascade-export-escape", "../escape", "a/../../escape",
                                 ".", "link/inside"])
async def test_export_writes_only_under_the_export_directory(export_env: Any,
                                                             out: str) -> None:
    gateway, client, tmp_path = export_env
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "link").symlink_to(tmp_path)  # a link out of the root
    reply = await client.post("/v1/ads", headers={"X-API-Key": API}, json={
        "request_id": "e1", "user_id": "7", "scene": "home_feed", "slots": 2})
    assert reply.status_code == 200
    await gateway.flush()
    reply = await client.post("/admin/export", headers={"X-API-Key": ADMIN}, json={"out": out})
    assert reply.status_code == 422 and reply.json()["field"] == "out", reply.text
    assert not Path("/tmp/cascade-export-escape").exists()
    assert not (tmp_path / "escape").exists() and not (tmp_path / "inside").exists()


@pytest.mark.anyio
async def test_openapi_describes_bodies_answers_and_the_key(export_env: Any) -> None:
    """Finding 8: /openapi.json (open, like /docs) documents the real request bodies, the error
    answers and the X-API-Key scheme, instead of body-less operations."""
    _, client, _ = export_env
    reply = await client.get("/openapi.json")
    assert reply.status_code == 200
    doc = reply.json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "the frontend key on /v1, the admin key on /admin"}
    ads = doc["paths"]["/v1/ads"]["post"]
    ref = ads["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"request_id", "user_id", "scene", "slots"} <= set(request["properties"])
    assert {"200", "401", "413", "422", "503"} <= set(ads["responses"])
    assert "Retry-After" in doc["paths"]["/v1/events"]["post"]["responses"]["503"]["headers"]
    reload = doc["paths"]["/admin/reload"]["post"]
    assert "403" in reload["responses"] and reload["security"] == [{"ApiKey": []}]
    assert "/admin/campaigns/{campaign_id}" in doc["paths"]
    assert (await client.get("/docs")).status_code == 200
