"""The retrieval stage over HTTP, loaded from a real bundle directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from models.bundle import BundleWriter
from models.features import load_schema
from services.common import wire
from services.common.config import Settings
from services.retrieval.app import create_app
from services.retrieval.index import normalize
from services.retrieval.state import load_retrieval_state, write_retrieval_artifacts
from tests.test_retrieval_index import clustered_corpus

N = 4000


def write_bundle(root: Path, version: str, *, exact_below: int = 1000) -> tuple[Path, dict]:
    vectors, ad_ids, queries = clustered_corpus(n=N, seed=3)
    rng = np.random.default_rng(3)
    scenes = [["search"] if i % 3 else ["home_feed", "search"] for i in range(N)]
    status = ["paused" if i % 10 == 0 else "active" for i in range(N)]
    bid_type = ["ocpa" if i % 4 == 0 else "cpc" for i in range(N)]
    catalog = {"ad_id": ad_ids, "scenes": scenes, "status": status, "bid_type": bid_type,
               "bid_micros": rng.integers(100_000, 2_000_000, N),
               "target_cpa_micros": rng.integers(1_000_000, 20_000_000, N)}
    writer = BundleWriter(root, load_schema(), version=version)
    spec = write_retrieval_artifacts(writer, vectors, ad_ids, pa.table(catalog),
                                     queries=queries, exact_below=exact_below, k=500)
    path = writer.commit()
    truth = {"ad_ids": ad_ids, "queries": queries, "spec": spec,
             "paused": {int(a) for a, s in zip(ad_ids, status, strict=True) if s == "paused"},
             "home": {int(a) for a, s in zip(ad_ids, scenes, strict=True) if "home_feed" in s}}
    return path, truth


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    _, truth = write_bundle(root, "v1")
    return root, truth


def test_loader_reads_the_bundle_and_its_recorded_nprobe(bundles):
    root, truth = bundles
    state = load_retrieval_state(str(root))
    assert state.version == "v1" and state.spec == truth["spec"]
    assert state.spec.kind == "ivf" and state.spec.recall_at_k >= 0.95
    assert state.recall.nprobe == truth["spec"].nprobe and state.recall.size == N


def write_value_bundle(root: Path, version: str, *, keep_index: bool = True):
    """A value-aware bundle (flat index, w = 0.05) with its cold-start eCPM file; without
    `keep_index` the faiss file is dropped, so the loader builds the index itself."""
    vectors, ad_ids, queries = clustered_corpus(n=N, seed=4)
    ecpm = np.random.default_rng(4).lognormal(10.0, 1.5, N).astype(np.float32)
    ecpm[:5] = 0.0  # no estimate: the catalog minimum stands in
    catalog = {"ad_id": ad_ids, "scenes": [["search"]] * N, "status": ["active"] * N}
    writer = BundleWriter(root, load_schema(), version=version)
    writer.save_arrays("cold_start.safetensors", {"ad_ids": ad_ids, "ecpm": ecpm})
    spec = write_retrieval_artifacts(writer, vectors, ad_ids, pa.table(catalog), queries=queries,
                                     ecpm=ecpm, value_weight=0.05)
    if not keep_index:
        writer.path("faiss.index").unlink()
    writer.commit()
    return spec, vectors, ad_ids, queries, ecpm


# the two-tower channel alone (the other channels: tests/test_recall_channels.py)
ANN_ONLY = {"category": 0.0, "high_value": 0.0, "new": 0.0}


def test_value_aware_bundle_records_its_term_and_serves_by_value(tmp_path):
    spec, vectors, ad_ids, queries, ecpm = write_value_bundle(tmp_path / "a", "v1")
    manifest = json.loads((tmp_path / "a" / "v1" / "manifest.json").read_text())
    recorded = manifest["retrieval"]["index"]
    positive = ecpm[ecpm > 0].astype(np.float64)
    logs = np.log(np.where(ecpm > 0, ecpm, positive.min()))
    assert recorded["value_weight"] == 0.05 and recorded["dim"] == 33
    assert recorded["value_mu"] == pytest.approx(logs.mean(), rel=1e-6)
    assert recorded["value_floor"] == pytest.approx(positive.min())
    want = queries[:4] @ normalize(vectors).T + 0.05 * (logs - logs.mean())
    for keep_index in (True, False):
        root = tmp_path / ("a" if keep_index else "b")
        if not keep_index:
            write_value_bundle(root, "v1", keep_index=False)
        state = load_retrieval_state(str(root))
        assert state.spec.value_weight == 0.05 and state.recall.dim == 32
        assert state.spec.value_mu == pytest.approx(spec.value_mu)
        for q, row in zip(queries[:4], want, strict=True):
            got = state.handle(wire.RecallRequest(scene="search", k=50, user_vector=q * 2.0,
                                                  quotas=ANN_ONLY))
            assert got.ad_ids.tolist() == ad_ids[np.argsort(-row)[:50]].tolist()
        added = state.update(wire.CatalogUpdate(ad_id=77_777_777, vector=queries[0],
                                                scenes=["search"], cold_score=float(ecpm.max())))
        assert added.added
        top = state.handle(wire.RecallRequest(scene="search", k=3, user_vector=queries[0],
                                              quotas=ANN_ONLY))
        assert top.ad_ids[0] == 77_777_777
        assert top.scores[0] == pytest.approx(
            1.0 + 0.05 * (np.log(ecpm.max()) - spec.value_mu), abs=1e-5)


def ready_client(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    for _ in range(500):
        if client.get("/readyz").status_code == 200:
            return client
        time.sleep(0.01)
    raise AssertionError(client.get("/readyz").json())


def test_recall_endpoint_serves_eligible_candidates(bundles):
    root, truth = bundles
    client = ready_client(create_app(Settings(auth=False), bundle=str(root)))
    try:
        request = wire.RecallRequest(scene="home_feed", k=300, user_vector=truth["queries"][0])
        for media in (wire.JSON, wire.PROTOBUF):
            got = client.post("/v1/recall", content=wire.encode(request, media),
                              headers={"content-type": media})
            body = wire.decode(wire.RecallResponse, got.content, media)
            ids = set(body.ad_ids.tolist())
            assert len(ids) == 300 and body.channel == "two_tower"
            assert ids <= truth["home"] and not ids & truth["paused"]
            assert body.info.model_version == "v1"
        cold = client.post("/v1/recall", json={"scene": "search", "user_id": 77, "k": 10})
        body = wire.decode(wire.RecallResponse, cold.content)
        assert body.channel == "cold_start" and len(body.ad_ids) == 10
        assert np.all(np.diff(body.scores) <= 0)
        wrong = client.post("/v1/recall", json={"scene": "search", "user_vector": [1.0, 2.0]})
        assert wrong.status_code == 422 and "dims" in wrong.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def test_admin_ads_adds_and_pauses_without_rebuild(bundles):
    root, truth = bundles
    client = ready_client(create_app(Settings(auth=False), bundle=str(root)))
    try:
        query = truth["queries"][1]
        new = wire.CatalogUpdate(ad_id=99_999_999, vector=query, scenes=["search"])
        added = client.post("/admin/ads", content=wire.encode(new))
        assert added.json() == {"ad_id": 99_999_999, "status": "active", "added": True}
        top = client.post("/v1/recall", json={"scene": "search", "k": 5,
                                              "user_vector": query.tolist()})
        assert wire.decode(wire.RecallResponse, top.content).ad_ids[0] == 99_999_999
        client.post("/admin/ads", json={"ad_id": 99_999_999, "scenes": ["search"],
                                        "status": "paused"})
        top = client.post("/v1/recall", json={"scene": "search", "k": 5,
                                              "user_vector": query.tolist()})
        assert 99_999_999 not in wire.decode(wire.RecallResponse, top.content).ad_ids
        missing_vector = client.post("/admin/ads", json={"ad_id": 5, "scenes": ["search"]})
        assert missing_vector.status_code == 422 and "vector" in missing_vector.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_real_uvicorn_process_serves_and_reloads(tmp_path):
    root = tmp_path / "bundles"
    _, truth = write_bundle(root, "v1")
    port = free_port()
    env = {**os.environ, "CASCADE_BUNDLE": str(root), "OMP_WAIT_POLICY": "PASSIVE",
           "CASCADE_AUTH": "off"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.retrieval.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, cwd=Path(__file__).resolve().parents[1])
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as client:
            for _ in range(300):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            else:
                raise AssertionError("retrieval never became ready")
            request = wire.RecallRequest(scene="search", k=100, user_vector=truth["queries"][2])
            got = client.post("/v1/recall", content=wire.encode(request, wire.PROTOBUF),
                              headers={"content-type": wire.PROTOBUF, "X-Cascade-Budget-Ms": "500"})
            body = wire.decode(wire.RecallResponse, got.content, wire.PROTOBUF)
            assert len(body.ad_ids) == 100 and body.info.model_version == "v1"
            write_bundle(root, "v2")  # moves `current`; an empty reload picks it up
            reloaded = client.post("/admin/reload")
            assert reloaded.json()["version"] == "v2" and reloaded.json()["previous"] == "v1"
            assert "cascade_request_seconds_bucket" in client.get("/metrics").text
    finally:
        proc.terminate()
        proc.wait(10)
