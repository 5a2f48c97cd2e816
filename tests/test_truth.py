"""The simulator's truth, rebuilt from a dataset, reproduces the logged probabilities exactly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.data import layout
from models.data.truth import Truth, TruthUnavailable


@pytest.fixture(scope="module")
def truth(tiny_data):
    return Truth.from_dataset(tiny_data)


@pytest.fixture(scope="module")
def logged(tiny_data):
    """Every logged impression with the behaviour sequence of its request ([rows, L])."""
    imp = pq.read_table(tiny_data / layout.IMPRESSIONS_DIR).to_pydict()
    req = pq.read_table(tiny_data / layout.REQUESTS_DIR,
                        columns=["request_id", "hist_ad_id"]).to_pydict()
    row_of = {r: i for i, r in enumerate(req["request_id"])}
    longest = max(len(h) for h in req["hist_ad_id"])
    hist = np.full((len(req["request_id"]), max(longest, 1)), -1, np.int32)
    for i, h in enumerate(req["hist_ad_id"]):
        hist[i, :len(h)] = h
    rows = np.asarray([row_of[r] for r in imp["request_id"]])
    return imp, hist[rows]


def test_reproduces_every_logged_probability_exactly(truth, logged):
    imp, hist = logged
    scene = np.asarray([truth.scene_of(s) for s in imp["scene"]])
    pctr, pcvr = truth.impressions(np.asarray(imp["user_id"]), hist, scene,
                                   np.asarray(imp["position"]), np.asarray(imp["ad_id"]))
    assert len(pctr) > 50_000
    np.testing.assert_array_equal(pctr, np.asarray(imp["true_pctr"], np.float32))
    np.testing.assert_array_equal(pcvr, np.asarray(imp["true_pcvr"], np.float32))


def test_request_query_over_the_whole_catalog_matches_the_rows(truth, logged):
    """The vectorised per-request path (one activation per category) equals the row-wise
    one, and so the log, for ads that were never shown to that user as well."""
    imp, hist = logged
    for i in (0, 17, 4242):
        ads = np.arange(truth.n_ads)
        seq = hist[i][hist[i] >= 0]
        pctr, pcvr = truth.request(imp["user_id"][i], seq, imp["scene"][i], imp["position"][i],
                                   ads)
        assert pctr[imp["ad_id"][i]] == np.float32(imp["true_pctr"][i])
        assert pcvr[imp["ad_id"][i]] == np.float32(imp["true_pcvr"][i])
        n = ads.size
        row_ctr, row_cvr = truth.impressions(np.full(n, imp["user_id"][i]),
                                             np.repeat(hist[i:i + 1], n, axis=0),
                                             np.full(n, truth.scene_of(imp["scene"][i])),
                                             np.full(n, imp["position"][i]), ads)
        np.testing.assert_array_equal(pctr, row_ctr)
        np.testing.assert_array_equal(pcvr, row_cvr)


def test_history_and_position_move_the_truth(truth):
    """A later slot is strictly less likely to be clicked; an empty history is allowed."""
    ads = np.arange(50)
    first, _ = truth.request(3, [], "search", 0, ads)
    third, _ = truth.request(3, [], "search", 2, ads)
    assert (third < first).all()
    same_cat = truth.market.category_ads[:5]
    with_hist, _ = truth.request(3, same_cat, "search", 0, ads)
    assert not np.array_equal(with_hist, first)


def test_refuses_unknown_ids_and_unsimulated_data(truth, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="ad ids"):
        truth.request(0, [], "search", 0, np.asarray([truth.n_ads]))
    with pytest.raises(ValueError, match="scene"):
        truth.request(0, [], "nowhere", 0, np.asarray([0]))
    copy = tmp_path / "imported"
    copy.mkdir()
    for name in (layout.ADS_FILE, layout.USERS_FILE):
        (copy / name).write_bytes((tiny_data / name).read_bytes())
    (copy / layout.IMPRESSIONS_DIR).mkdir()
    first = sorted((tiny_data / layout.IMPRESSIONS_DIR).glob("*.parquet"))[0]
    (copy / layout.IMPRESSIONS_DIR / first.name).write_bytes(first.read_bytes())
    (copy / layout.SUMMARY_FILE).write_text(json.dumps({"ads": 1}))
    with pytest.raises(TruthUnavailable):
        Truth.from_dataset(copy)


def test_serving_code_never_imports_the_truth():
    """Only offline tools (replay, funnel) may know the truth: the gateway and stages must
    not import it, even indirectly."""
    import subprocess
    import sys

    serving = ("services.gateway.app", "services.gateway.stage_loaders",
               "services.rank.ranker", "services.prerank.preranker", "services.retrieval.state")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in serving)
            + "print(sorted(m for m in sys.modules if m in ('models.data.truth', "
              "'services.replay', 'models.data.simulator')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
