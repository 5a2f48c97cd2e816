"""`cascade funnel` measures the cascade against the full ranker over the whole corpus."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from models.bundle import read_bundle
from models.train.split import TimeSplit
from services.gateway.funnel import Funnel, run_funnel, sample_requests, top_per_campaign

CASCADE = [sys.executable, "-m", "cli.main"]


@pytest.fixture(scope="module")
def funnel(tiny_data, tiny_bundle):
    return Funnel(str(tiny_bundle), tiny_data)


def test_ideal_set_is_best_ecpm_one_per_campaign(funnel):
    ids = funnel.catalog.view.ads.ad_id[:50]
    ecpm = np.linspace(1.0, 2.0, ids.size)
    chosen = ids[top_per_campaign(funnel.catalog, ids, ecpm, 10)]
    campaigns = funnel.catalog.view.ads.campaign_id[funnel.catalog.rows_of(chosen)]
    assert len(set(campaigns.tolist())) == len(chosen) <= 10
    assert chosen[0] == ids[-1]  # the highest eCPM leads


def test_ideal_set_head_only_equals_a_full_sort(funnel):
    """The partitioned head gives what sorting everything gives, ties and few campaigns too."""
    view = funnel.catalog.view
    rng = np.random.default_rng(0)
    for trial in range(30):
        ids = rng.choice(view.ads.ad_id[:view.n_ads], size=int(rng.integers(1, 3000)),
                         replace=False)
        ecpm = rng.integers(0, 5 if trial % 2 else 10_000, ids.size).astype(np.float64)
        n = int(rng.integers(1, 40))
        order = np.lexsort((ids, -ecpm))
        campaigns = view.ads.campaign_id[funnel.catalog.rows_of(ids[order])]
        _, first = np.unique(campaigns, return_index=True)
        expected = order[np.sort(first)][:n]
        np.testing.assert_array_equal(top_per_campaign(funnel.catalog, ids, ecpm, n), expected)


def test_each_stage_keeps_a_subset_of_the_one_before(funnel, tiny_data):
    split = TimeSplit.from_dict(funnel.bundle.manifest["split"])
    req = sample_requests(tiny_data, split, 1, seed=3)[0]
    stages = funnel.cascade(req)
    assert set(stages["screen"].tolist()) <= set(stages["retrieval"].tolist())
    assert set(stages["prerank"].tolist()) <= set(stages["screen"].tolist())
    assert stages["prerank"].size <= funnel.config.k3
    eligible = set(funnel.eligible(req.scene).tolist())
    assert set(stages["screen"].tolist()) <= eligible


def test_report_is_consistent(tiny_data, tiny_bundle):
    result = run_funnel(tiny_data, tiny_bundle, requests=3, top_n=5)
    survival = result["survival"]
    assert 0.0 <= survival["prerank"] <= survival["screen"] <= survival["retrieval"] <= 1.0
    assert result["reach_ranker"] == survival["prerank"]
    assert 0.0 <= result["ecpm_lost"] <= 1.0
    assert result["bundle"] == read_bundle(tiny_bundle).version
    # simulated data: the same stages against the oracle's top N (true eCPM)
    oracle = result["vs_oracle"]
    kept = oracle["survival"]
    assert 0.0 <= kept["prerank"] <= kept["screen"] <= kept["retrieval"] <= 1.0
    assert oracle["reach_ranker"] == kept["prerank"]
    assert 0.0 <= oracle["ecpm_lost"] <= 1.0  # the oracle's pick is the best one per campaign


def test_oracle_top_n_is_the_true_best(funnel, tiny_data):
    """The oracle's ideal set is priced by the simulator's truth, not by the ranker."""
    split = TimeSplit.from_dict(funnel.bundle.manifest["split"])
    req = sample_requests(tiny_data, split, 1, seed=5)[0]
    corpus = funnel.eligible(req.scene)
    true = funnel.true_ecpm(req, corpus)
    pctr, pcvr = funnel.truth.request(req.user_id, req.hist["hist_ad_id"].ints, req.scene, 0,
                                      corpus)
    ocpa, bid, tcpa = funnel.truth.bid_terms(corpus)
    np.testing.assert_allclose(true, 1000.0 * pctr * np.where(ocpa, tcpa * pcvr, bid),
                               rtol=1e-6)
    stages = funnel.cascade(req)
    best = corpus[top_per_campaign(funnel.catalog, corpus, true, 5)]
    out = funnel.against_oracle(req, corpus, stages, best, 5)
    assert out["oracle_ecpm_lost"] == pytest.approx(0.0, abs=1e-12)


def test_cli_writes_json(tiny_data, tiny_bundle, tmp_path):
    out = tmp_path / "funnel.json"
    proc = subprocess.run(CASCADE + ["funnel", "--data", str(tiny_data), "--bundle",
                                     str(tiny_bundle), "--requests", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out.read_text())["survival"]) == {"retrieval", "screen", "prerank"}
    bad = subprocess.run(CASCADE + ["funnel", "--data", str(tmp_path), "--bundle",
                                    str(tiny_bundle), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_bundle_index_is_value_aware_at_the_two_tower_temperature(funnel):
    """`cascade train`'s index (shared helper): w = tau, mu = mean log Qscore eCPM."""
    manifest = funnel.bundle.manifest
    index = manifest["index"]
    tau = manifest["models"]["two_tower"]["config"]["temperature"]
    ecpm = funnel.bundle.arrays("cold_start.safetensors")["ecpm"].astype(np.float64)
    logs = np.log(np.maximum(ecpm, ecpm[ecpm > 0].min()))
    assert index["value_weight"] == tau > 0
    assert index["value_mu"] == pytest.approx(logs.mean(), rel=1e-6)
    vectors = funnel.bundle.arrays("two_tower_ad_vectors.safetensors")["vectors"]
    assert index["dim"] == vectors.shape[1] + 1  # the plain vectors stay in the bundle
