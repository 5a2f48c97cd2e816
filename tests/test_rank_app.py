"""The ranking stage over HTTP: scores, limits (413/422), and batching on CPU when asked."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from services.common import wire
from services.common.config import Settings
from services.rank.app import RankOptions, create_app
from services.rank.batcher import BatchSettings

BODY = {"scene": "search", "user": {"age_bucket": 2, "gender": "male"},
        "hist": {"hist_ad_id": {"ints": [3, 4, 5]}, "hist_category_id": {"ints": [1, 1, 2]}},
        "context": {"hour": 12}}


def ready(client: TestClient) -> TestClient:
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def ad_ids(tiny_bundle):
    table = pq.read_table(f"{tiny_bundle}/current/catalog.parquet", columns=["ad_id"])
    return table.column("ad_id").to_numpy()


@pytest.fixture(scope="module")
def client(tiny_bundle):
    options = RankOptions(device="cpu", max_candidates=300, max_history=100)
    with TestClient(create_app(Settings(auth=False, bundle=str(tiny_bundle)),
                               options=options)) as client:
        yield ready(client)


def test_rank_returns_three_probabilities_per_candidate(client, ad_ids):
    answer = client.post("/v1/rank", json={**BODY, "ad_ids": ad_ids[:150].tolist()})
    assert answer.status_code == 200, answer.text
    got = wire.decode(wire.RankResponse, answer.content)
    assert got.ad_ids.tolist() == ad_ids[:150].tolist()
    assert ((got.pctr > 0) & (got.pctr < 1)).all() and ((got.pcvr > 0) & (got.pcvr < 1)).all()
    np.testing.assert_allclose(got.pctcvr, got.pctr * got.pcvr, rtol=1e-5)
    assert got.info.model_version


def test_limits_answer_413_and_misaligned_features_422(client, ad_ids):
    many = client.post("/v1/rank", json={**BODY, "ad_ids": list(range(301))})
    assert many.status_code == 413 and many.json()["field"] == "ad_ids"
    long = {**BODY, "hist": {"hist_ad_id": {"ints": list(range(101))}}, "ad_ids": [1]}
    too_long = client.post("/v1/rank", json=long)
    assert too_long.status_code == 413 and too_long.json()["field"] == "hist.hist_ad_id"
    bad = client.post("/v1/rank", json={**BODY, "ad_ids": [1, 2],
                                        "ad_features": {"campaign_id": {"ints": [1]}}})
    assert bad.status_code == 422 and bad.json()["field"] == "ad_features.campaign_id"
    assert client.post("/v1/rank", json={"ad_ids": [1]}).json()["field"] == "scene"


def test_batching_on_cpu_gives_the_same_scores_and_reports_batches(tiny_bundle, client,
                                                                    ad_ids):
    options = RankOptions(device="cpu", batching=BatchSettings(True, 2000, 20_000), threads=8)
    bodies = [{**BODY, "ad_ids": ad_ids[i * 30:(i + 1) * 30].tolist()} for i in range(6)]
    direct = [wire.decode(wire.RankResponse, client.post("/v1/rank", json=b).content).pctr
              for b in bodies]
    app = create_app(Settings(auth=False, bundle=str(tiny_bundle)), options=options)
    with TestClient(app) as batched:
        ready(batched)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda b: batched.post("/v1/rank", json=b), bodies))
        for answer, want in zip(answers, direct, strict=True):
            got = wire.decode(wire.RankResponse, answer.content).pctr
            np.testing.assert_allclose(got, want, rtol=1e-5)
        metrics = batched.get("/metrics").text
        assert "cascade_batch_size_count" in metrics
        assert 'endpoint="/v1/rank:batch"' in metrics  # batch queue apart from compute
    app.state.batcher.close()
