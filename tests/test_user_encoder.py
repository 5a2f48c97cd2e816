"""The retrieval stage's user tower: wire features -> the bundle's two-tower user vector."""

from __future__ import annotations

import numpy as np
import torch
from fastapi.testclient import TestClient

from models.bundle import read_bundle
from services.common import wire
from services.common.config import Settings
from services.retrieval.app import create_app
from services.retrieval.user_encoder import TwoTowerUserEncoder, two_tower_user_encoder

USER = {"age_bucket": 3, "gender": "female", "city_tier": 2}
HIST = {"hist_ad_id": wire.Column(ints=[11, 12, 13, -1]),
        "hist_category_id": wire.Column(ints=[4, 4, 9, -1])}


def test_numpy_tower_equals_the_torch_user_tower(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    encoder = TwoTowerUserEncoder.from_bundle(bundle)
    for user, hist in [(USER, HIST), ({}, {}), ({"gender": "martian", "age_bucket": 99}, HIST)]:
        got = encoder.encode(user, hist)
        with torch.inference_mode():
            want = encoder.model.user_vector(encoder.encoder.user_batch(user, hist))[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_history_order_matters_and_pads_do_not(tiny_bundle):
    encoder = TwoTowerUserEncoder.from_bundle(read_bundle(tiny_bundle))
    padded = {k: wire.Column(ints=v.ints.tolist() + [-1] * 30) for k, v in HIST.items()}
    np.testing.assert_allclose(encoder.encode(USER, HIST), encoder.encode(USER, padded),
                               atol=1e-6)
    other = {"hist_ad_id": wire.Column(ints=[900, 901]),
             "hist_category_id": wire.Column(ints=[200, 201])}
    assert not np.allclose(encoder.encode(USER, HIST), encoder.encode(USER, other))


def test_factory_returns_none_without_a_two_tower(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    bundle.manifest = {**bundle.manifest, "models": {"dqm": bundle.manifest["models"]["dqm"]}}
    assert two_tower_user_encoder(bundle) is None


def test_retrieval_app_uses_the_user_tower_by_default(tiny_bundle):
    settings = Settings(auth=False, bundle=str(tiny_bundle))
    with TestClient(create_app(settings)) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            import time
            time.sleep(0.05)
        body = {"scene": "home_feed", "k": 50, "user": USER,
                "hist": {"hist_ad_id": {"ints": [11, 12, 13]},
                         "hist_category_id": {"ints": [4, 4, 9]}},
                "eligibility": {"ignore_scene_targeting": True, "include_paused": True}}
        answer = client.post("/v1/recall", json=body)
        assert answer.status_code == 200, answer.text
        got = wire.decode(wire.RecallResponse, answer.content)
        assert got.channel == "two_tower" and len(got.ad_ids) == 50
        # the same user as an explicit vector gives the same ads
        vector = TwoTowerUserEncoder.from_bundle(read_bundle(tiny_bundle)).encode(
            USER, {k: v["ints"] for k, v in body["hist"].items()})
        explicit = {**body, "user_vector": vector.tolist()}
        same = wire.decode(wire.RecallResponse,
                           client.post("/v1/recall", json=explicit).content)
        assert same.ad_ids.tolist() == got.ad_ids.tolist()
        cold = client.post("/v1/recall", json={"scene": "home_feed", "k": 10})
        assert wire.decode(wire.RecallResponse, cold.content).channel == "cold_start"
