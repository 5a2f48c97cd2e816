"""The shared stage adapter: health, readiness, metrics, limits, deadlines and atomic reloads."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.common import wire
from services.common.deadline import BUDGET_HEADER, Deadline
from services.common.stage_app import Endpoint, StageLimits, create_stage_app


@dataclass
class EchoState:
    """A stand-in stage: scores each candidate with the bundle's weight."""

    version: str
    weight: float
    gate: threading.Event | None = None


def load_echo(path: str) -> EchoState:
    config = json.loads((Path(path) / "manifest.json").read_text())
    if config.get("broken"):
        raise ValueError("weights are corrupt")
    return EchoState(config["version"], config["weight"])


def echo(state: EchoState, request: wire.PrerankRequest, deadline: Deadline):
    if state.gate is not None:
        state.gate.wait(5)
    scores = np.full(len(request.ad_ids), state.weight, dtype=np.float32)
    return wire.PrerankResponse(ad_ids=request.ad_ids[: request.k], scores=scores[: request.k])


ENDPOINT = Endpoint("/v1/prerank", wire.PrerankRequest, echo,
                    count_in=lambda r: len(r.ad_ids), count_out=lambda r: len(r.ad_ids))


def bundle(tmp_path: Path, version: str, weight: float = 1.0, broken: bool = False) -> str:
    path = tmp_path / version
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps(
        {"version": version, "weight": weight, "broken": broken}))
    return str(path)


def app_for(tmp_path, **options):
    limits = StageLimits(max_body_bytes=64 * 1024, max_candidates=1000, max_history=50)
    return create_stage_app("prerank", load_echo, endpoints=(ENDPOINT,),
                            bundle=bundle(tmp_path, "v1", 1.0), limits=limits, **options)


def test_ready_only_after_the_bundle_loads(tmp_path):
    app = create_stage_app("prerank", load_echo, endpoints=(ENDPOINT,))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/prerank", json={"scene": "s"}).status_code == 503
        reload = client.post("/admin/reload", json={"bundle": bundle(tmp_path, "v1")})
        assert reload.status_code == 200 and reload.json()["version"] == "v1"
        assert client.get("/readyz").json() == {"ready": True, "stage": "prerank",
                                                "version": "v1"}


def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            return
        threading.Event().wait(0.01)
    raise AssertionError("stage never became ready")


def test_scores_in_json_and_protobuf_with_stage_info(tmp_path):
    with TestClient(app_for(tmp_path)) as client:
        wait_ready(client)
        got = client.post("/v1/prerank", json={"scene": "s", "ad_ids": [3, 1, 2], "k": 2})
        assert got.status_code == 200
        body = wire.decode(wire.PrerankResponse, got.content)
        assert body.ad_ids.tolist() == [3, 1] and body.info.model_version == "v1"
        request = wire.PrerankRequest(scene="s", ad_ids=np.array([9, 8]))
        got = client.post("/v1/prerank", content=wire.encode(request, wire.PROTOBUF),
                          headers={"content-type": wire.PROTOBUF})
        assert got.headers["content-type"] == wire.PROTOBUF
        assert wire.decode(wire.PrerankResponse, got.content, wire.PROTOBUF).ad_ids.tolist() \
            == [9, 8]


def test_bad_and_oversized_requests_name_the_problem(tmp_path):
    with TestClient(app_for(tmp_path)) as client:
        wait_ready(client)
        bad = client.post("/v1/prerank", json={"scene": "s", "k": "lots"})
        assert bad.status_code == 422 and bad.json()["field"] == "k"
        many = client.post("/v1/prerank", json={"scene": "s", "ad_ids": list(range(1001))})
        assert many.status_code == 413 and many.json()["field"] == "ad_ids"
        long_hist = {"scene": "s", "hist": {"hist_ad_id": {"ints": list(range(51))}}}
        got = client.post("/v1/prerank", json=long_hist)
        assert got.status_code == 413 and got.json()["field"] == "hist.hist_ad_id"
        huge = client.post("/v1/prerank", content=b"{" + b" " * 100_000 + b"}",
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413
        junk = client.post("/v1/prerank", content=b"\xff\xfe",
                           headers={"content-type": wire.PROTOBUF})
        assert junk.status_code == 422 and junk.json()["field"] == "body"


def test_spent_budget_gets_a_fast_deadline_answer(tmp_path):
    with TestClient(app_for(tmp_path)) as client:
        wait_ready(client)
        for budget in ("0", "-3", "soon"):
            got = client.post("/v1/prerank", json={"scene": "s", "ad_ids": [1]},
                              headers={BUDGET_HEADER: budget})
            assert got.status_code == 504 and got.json()["detail"] == "deadline exceeded"
        ok = client.post("/v1/prerank", json={"scene": "s", "ad_ids": [1]},
                         headers={BUDGET_HEADER: "5000"})
        assert ok.status_code == 200
        metrics = client.get("/metrics").text
        assert 'cascade_deadline_exceeded_total{endpoint="/v1/prerank",stage="prerank"} 3.0' \
            in metrics


def test_metrics_report_latency_candidates_and_version(tmp_path):
    with TestClient(app_for(tmp_path)) as client:
        wait_ready(client)
        client.post("/v1/prerank", json={"scene": "s", "ad_ids": [1, 2, 3], "k": 2})
        text = client.get("/metrics").text
        for series in ('cascade_request_seconds_count{endpoint="/v1/prerank",stage="prerank"} 1.0',
                       'cascade_queue_seconds_count{endpoint="/v1/prerank",stage="prerank"} 1.0',
                       'cascade_candidates_in_sum{endpoint="/v1/prerank",stage="prerank"} 3.0',
                       'cascade_candidates_out_sum{endpoint="/v1/prerank",stage="prerank"} 2.0',
                       'cascade_model_info{stage="prerank",version="v1"} 1.0'):
            assert series in text


def test_reload_swaps_while_in_flight_requests_finish_on_the_old_bundle(tmp_path):
    app = app_for(tmp_path)
    with TestClient(app) as client:
        wait_ready(client)
        gate = threading.Event()
        app.state.runtime.state.gate = gate  # the next request blocks inside v1
        result: dict = {}

        def slow_request() -> None:
            got = client.post("/v1/prerank", json={"scene": "s", "ad_ids": [1]})
            result["body"] = wire.decode(wire.PrerankResponse, got.content)

        worker = threading.Thread(target=slow_request)
        worker.start()
        threading.Event().wait(0.2)
        swapped = client.post("/admin/reload", json={"bundle": bundle(tmp_path, "v2", 2.0)})
        assert swapped.json() | {"load_ms": 0} == {"version": "v2", "previous": "v1",
                                                   "load_ms": 0}
        fresh = wire.decode(wire.PrerankResponse,
                            client.post("/v1/prerank", json={"scene": "s", "ad_ids": [1]}).content)
        assert fresh.info.model_version == "v2" and fresh.scores.tolist() == [2.0]
        gate.set()
        worker.join(5)
        assert result["body"].info.model_version == "v1" and result["body"].scores.tolist() == [1]


def test_failed_reload_keeps_the_old_bundle_and_says_why(tmp_path):
    with TestClient(app_for(tmp_path)) as client:
        wait_ready(client)
        broken = client.post("/admin/reload",
                             json={"bundle": bundle(tmp_path, "v2", broken=True)})
        assert broken.status_code == 422 and "weights are corrupt" in broken.json()["detail"]
        missing = client.post("/admin/reload", json={"bundle": str(tmp_path / "nope")})
        assert missing.status_code == 404 and "bundle not found" in missing.json()["detail"]
        assert client.get("/readyz").json()["version"] == "v1"
        got = client.post("/v1/prerank", json={"scene": "s", "ad_ids": [1]})
        assert wire.decode(wire.PrerankResponse, got.content).info.model_version == "v1"
        assert client.post("/admin/reload").json()["version"] == "v1"  # empty body: configured


def test_admin_key_guards_reload(tmp_path):
    with TestClient(app_for(tmp_path, admin_key="secret")) as client:
        wait_ready(client)
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"X-API-Key": "secret"}).status_code == 200


@pytest.mark.anyio
async def test_concurrent_requests_over_asgi_transport(tmp_path):
    app = app_for(tmp_path)
    app.state.runtime.install(load_echo(bundle(tmp_path, "v9", 3.0)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stage") as client:
        import anyio

        results: list[int] = []

        async def one(i: int) -> None:
            got = await client.post("/v1/prerank", json={"scene": "s", "ad_ids": [i]})
            results.append(int(wire.decode(wire.PrerankResponse, got.content).ad_ids[0]))

        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(one, i)
    assert sorted(results) == list(range(20))
