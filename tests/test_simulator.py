"""The simulator's logs obey the ground truth the models are measured against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.data import layout
from models.data.sim_config import apply_overrides, preset
from models.data.sim_market import build_marketplace
from models.data.simulator import history_activation, simulate, true_logits
from models.train.metrics import auc
from tests.fixtures_data import DATA_SEED, micro_config


def read_log(path: Path) -> tuple[dict, dict, np.ndarray]:
    """Impressions and requests as numpy columns, plus raw [requests, 50] histories (-1 pad)."""
    imp = pq.read_table(path / layout.IMPRESSIONS_DIR)
    req = pq.read_table(path / layout.REQUESTS_DIR).sort_by("request_id")
    hist = np.full((req.num_rows, 50), -1, dtype=np.int64)
    for r, seq in enumerate(req.column("hist_ad_id").to_pylist()):
        hist[r, :len(seq)] = seq
    cols = {c: imp.column(c).to_numpy(zero_copy_only=False) for c in imp.column_names}
    rcols = {c: req.column(c).to_numpy(zero_copy_only=False) for c in
             ("request_id", "ts", "user_id", "scene")}
    rcols["hist_category_id"] = req.column("hist_category_id").to_pylist()
    return cols, rcols, hist


def replay_sequences(path: Path, initial: np.ndarray) -> None:
    """Rebuild every request's sequence from the initial histories and the click log alone,
    request by request in time order, and demand the stored one is identical."""
    imp, req, hist = read_log(path)
    clicked = imp["click"] == 1
    by_request: dict[int, list[tuple[int, int]]] = {}
    for r, pos, ad in zip(imp["request_id"][clicked], imp["position"][clicked],
                          imp["ad_id"][clicked], strict=True):
        by_request.setdefault(int(r), []).append((int(pos), int(ad)))
    state = {u: [int(a) for a in row if a >= 0] for u, row in enumerate(initial)}
    assert (np.diff(req["ts"]) > 0).all(), "request timestamps must be distinct and ordered"
    for row in np.argsort(req["ts"], kind="stable"):
        user = int(req["user_id"][row])
        stored = [int(a) for a in hist[row] if a >= 0]
        assert stored == state[user][:50], f"request {req['request_id'][row]} sequence differs"
        clicks = [ad for _, ad in sorted(by_request.get(int(req["request_id"][row]), []))]
        state[user] = (clicks[::-1] + state[user])[:50]


def test_conversion_implies_click_and_probabilities_are_stored(tiny_data: Path):
    imp, _, _ = read_log(tiny_data)
    assert ((imp["conversion"] == 1) <= (imp["click"] == 1)).all()
    for name in ("true_pctr", "true_pcvr"):
        assert imp[name].dtype == np.float32
        assert ((imp[name] > 0) & (imp[name] < 1)).all()


def test_sequences_are_exactly_the_clicks_strictly_before_each_request(micro_data: Path):
    replay_sequences(micro_data, build_marketplace(micro_config(), DATA_SEED).initial_history)


def test_sequence_categories_match_their_ads(micro_data: Path):
    ads = pq.read_table(micro_data / layout.ADS_FILE).column("category_id").to_numpy()
    _, req, hist = read_log(micro_data)
    for row in range(0, hist.shape[0], 97):
        seq = hist[row][hist[row] >= 0]
        assert list(ads[seq]) == req["hist_category_id"][row]


def test_position_effect_is_monotone_and_reproduces_stored_pctr(tiny_data: Path):
    cfg = preset("tiny")
    market = build_marketplace(cfg, DATA_SEED)
    imp, req, hist = read_log(tiny_data)
    rows = np.arange(0, imp["ad_id"].shape[0], 53)
    req_row = np.searchsorted(req["request_id"], imp["request_id"][rows])
    scene = np.array([market.scenes.index(s) for s in imp["scene"][rows]])
    ad, user = imp["ad_id"][rows], imp["user_id"][rows]
    act = history_activation(cfg, market, hist[req_row].astype(np.int32), ad)
    ctr, _ = true_logits(cfg, market, user, ad, scene, imp["position"][rows], act)
    np.testing.assert_allclose(1 / (1 + np.exp(-ctr)), imp["true_pctr"][rows], rtol=1e-5)
    by_slot = np.stack([true_logits(cfg, market, user, ad, scene, np.full(rows.shape, p), act)[0]
                        for p in range(8)], axis=1)
    assert (np.diff(by_slot, axis=1) < 0).all()


def test_rates_oracle_and_summary_are_in_range(tiny_data: Path):
    summary = json.loads((tiny_data / layout.SUMMARY_FILE).read_text())
    assert summary["ads"] == 5_000 and 90_000 <= summary["impressions"] <= 120_000
    assert 0.01 <= summary["ctr"] <= 0.05 and 0.01 <= summary["cvr"] <= 0.10
    assert 0.70 <= summary["oracle"]["ctr_auc"] <= 0.85
    assert 0.65 <= summary["oracle"]["ctr_gauc"] <= 0.85
    assert summary["oracle"]["cvr_auc"] > 0.6
    scene_ctr = {k: v["ctr"] for k, v in summary["by_scene"].items()}
    assert set(scene_ctr) == {"home_feed", "search", "product_detail"}
    assert len({round(v, 3) for v in scene_ctr.values()}) == 3  # scenes differ
    slot_ctr = [summary["by_position"][str(p)]["ctr"] for p in range(6)]
    assert slot_ctr == sorted(slot_ctr, reverse=True)
    assert (tiny_data / layout.SCHEMA_FILE).is_file()


def test_local_activation_beats_the_history_average(tiny_data: Path):
    """History matters through its most relevant behaviours, not its mean (what DIN uses)."""
    cfg = preset("tiny")
    market = build_marketplace(cfg, DATA_SEED)
    imp, req, hist = read_log(tiny_data)
    h = hist[np.searchsorted(req["request_id"], imp["request_id"])]
    act = history_activation(cfg, market, h.astype(np.int32), imp["ad_id"])
    cat = market.ads["category_id"]
    sim = market.category_sim[cat[np.maximum(h, 0)], cat[imp["ad_id"]][:, None]]
    mean_sim = (sim * (h >= 0)).sum(axis=1) / np.maximum((h >= 0).sum(axis=1), 1)
    assert auc(imp["click"], act) > auc(imp["click"], mean_sim) + 0.02
    assert auc(imp["click"], act) > 0.65


def test_policy_exposes_active_ads_only_in_targeted_scenes(tiny_data: Path):
    ads = pq.read_table(tiny_data / layout.ADS_FILE).to_pydict()
    imp, _, _ = read_log(tiny_data)
    shown = np.bincount(imp["ad_id"], minlength=len(ads["ad_id"]))
    active = np.array(ads["status"]) == "active"
    assert shown[~active].sum() == 0
    assert (shown[active] > 0).mean() > 0.9  # the random part reaches almost every ad
    for i in range(0, imp["ad_id"].shape[0], 101):
        assert imp["scene"][i] in ads["scenes"][imp["ad_id"][i]]
    assert (np.array(ads["category_id"]) < 1024).all()


def test_same_seed_same_data_and_other_seed_other_data(tmp_path: Path, micro_data: Path):
    simulate(micro_config(), DATA_SEED, tmp_path / "again")
    simulate(micro_config(), DATA_SEED + 1, tmp_path / "other")
    for part in (layout.ADS_FILE, layout.USERS_FILE, layout.IMPRESSIONS_DIR, layout.REQUESTS_DIR):
        assert pq.read_table(micro_data / part).equals(pq.read_table(tmp_path / "again" / part))
    assert not pq.read_table(micro_data / layout.IMPRESSIONS_DIR).equals(
        pq.read_table(tmp_path / "other" / layout.IMPRESSIONS_DIR))


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), slots=st.integers(1, 8), chunk=st.integers(200, 2_000),
       interest=st.floats(0.0, 1.0))
def test_properties_hold_for_any_seed_and_config(tmp_path_factory: pytest.TempPathFactory,
                                                 seed: int, slots: int, chunk: int,
                                                 interest: float):
    cfg = apply_overrides(preset("tiny"), {
        "market": {"n_advertisers": 40, "n_campaigns": 80, "n_ads": 600, "n_brands": 100,
                   "n_leaf_categories": 60},
        "users": {"n_users": 200},
        "scenes": {"search": {"slots": slots}},
        "policy": {"interest_share": interest},
        "log": {"n_requests": 1_500, "chunk_requests": chunk, "days": 1},
    }).validate()
    out = tmp_path_factory.mktemp("prop") / "data"
    summary = simulate(cfg, seed, out)
    imp, _, _ = read_log(out)
    assert ((imp["conversion"] == 1) <= (imp["click"] == 1)).all()
    assert imp["position"][imp["scene"] == "search"].max() == slots - 1
    assert summary["impressions"] == imp["ad_id"].shape[0]
    replay_sequences(out, build_marketplace(cfg, seed).initial_history)
