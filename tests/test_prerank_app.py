"""The pre-ranking stage over HTTP, loaded from a real bundle directory."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from services.common import wire
from services.common.config import Settings
from services.prerank.app import create_app

INTERNAL = "internal-key-0123456789"


@pytest.fixture(scope="module")
def client(tiny_bundle):
    settings = Settings(bundle=str(tiny_bundle), internal_key=INTERNAL)
    with TestClient(create_app(settings), headers={"X-API-Key": INTERNAL}) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def ad_ids(tiny_bundle):
    table = pq.read_table(f"{tiny_bundle}/current/catalog.parquet", columns=["ad_id"])
    return table.column("ad_id").to_numpy()


def test_prerank_answers_top_k_with_scores(client, ad_ids):
    body = {"scene": "search", "k": 20, "user": {"age_bucket": 1, "gender": "female"},
            "hist": {"hist_ad_id": {"ints": [1, 2]}, "hist_category_id": {"ints": [5, 5]}},
            "ad_ids": ad_ids[:500].tolist() + [10**15]}
    answer = client.post("/v1/prerank", json=body)
    assert answer.status_code == 200, answer.text
    got = wire.decode(wire.PrerankResponse, answer.content)
    assert len(got.ad_ids) == 20 and (np.diff(got.scores) <= 0).all()
    assert got.info.model_version and got.info.compute_ms > 0
    metrics = client.get("/metrics").text
    assert 'cascade_unknown_candidates_total{stage="prerank"} 1.0' in metrics


def test_protobuf_round_trip(client, ad_ids):
    request = wire.PrerankRequest(scene="home_feed", ad_ids=ad_ids[:300], k=5)
    answer = client.post("/v1/prerank", content=wire.encode(request, wire.PROTOBUF),
                         headers={"content-type": wire.PROTOBUF})
    assert answer.status_code == 200
    assert len(wire.decode(wire.PrerankResponse, answer.content, wire.PROTOBUF).ad_ids) == 5


def test_bad_and_oversized_requests_name_the_field(client, ad_ids):
    missing = client.post("/v1/prerank", json={"ad_ids": [1, 2]})
    assert missing.status_code == 422 and missing.json()["field"] == "scene"
    huge = client.post("/v1/prerank", json={"scene": "search", "ad_ids": list(range(10_001))})
    assert huge.status_code == 413 and huge.json()["field"] == "ad_ids"


def test_admin_adds_an_ad_that_then_scores(client, ad_ids):
    new_id = int(ad_ids.max()) + 77
    update = {"ad_id": new_id, "features": {"campaign_id": 3, "category_id": 12,
                                            "bid_type": "cpc", "price_bucket": 4}}
    assert client.post("/admin/ads", json=update, headers={"X-API-Key": ""}).status_code == 401
    added = client.post("/admin/ads", json=update, headers={"X-API-Key": INTERNAL})
    assert added.status_code == 200 and added.json()["added"] is True
    answer = client.post("/v1/prerank", json={"scene": "search", "k": 600,
                                              "ad_ids": [new_id, *ad_ids[:100].tolist()]})
    got = wire.decode(wire.PrerankResponse, answer.content)
    assert new_id in got.ad_ids.tolist() and len(got.ad_ids) == 101
