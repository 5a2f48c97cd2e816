"""The encoded log: what training reads, joined and encoded with the schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from models.data import layout
from models.data.dataset import load_encoded_log, open_marketplace
from models.features.schema import load_schema


def test_encoded_log_joins_and_encodes_every_feature(micro_data: Path):
    schema = load_schema()
    log = load_encoded_log(micro_data)
    imp = pq.read_table(micro_data / layout.IMPRESSIONS_DIR).sort_by("ts")
    ads = pq.read_table(micro_data / layout.ADS_FILE).to_pydict()
    users = pq.read_table(micro_data / layout.USERS_FILE).to_pydict()
    assert len(log) == imp.num_rows
    assert (np.diff(log.ts) >= 0).all()
    expected = {n for g in ("user", "ad", "scene") for n in schema.names(g)}
    assert set(log.features) == expected
    for name, col in log.features.items():
        assert col.dtype == np.int64 and col.shape == (len(log),)
        assert (col > 0).all(), f"{name}: every impression has a known value"
    i = len(log) // 2
    ad, user = int(log.ad_id[i]), int(log.user_id[i])
    assert log.features["category_id"][i] == schema["category_id"].encode_one(
        ads["category_id"][ad])
    assert log.features["gender"][i] == schema["gender"].encode_one(users["gender"][user])
    assert log.features["scene"][i] == schema["scene"].encode_one(imp.column("scene")[i].as_py())
    assert log.click.dtype == np.float32 and set(np.unique(log.click)) <= {0.0, 1.0}
    assert not np.isnan(log.true_pctr).any()


def test_sequences_are_per_request_padded_with_zero_and_gathered_per_batch(micro_data: Path):
    log = load_encoded_log(micro_data)
    req = pq.read_table(micro_data / layout.REQUESTS_DIR)
    seq = log.sequences["hist_ad_id"]
    assert seq.shape[0] == req.num_rows + 1 and seq.shape[1] == 50  # + one all-padding row
    idx = np.arange(0, len(log), 7)
    batch = log.batch(idx)
    assert batch["hist_ad_id"].shape == (idx.shape[0], 50)
    assert batch["hist_ad_id"].dtype == np.int64
    req_ids = req.column("request_id").to_numpy()
    raw = req.column("hist_ad_id").to_pylist()
    for j in range(0, idx.shape[0], 50):
        stored = raw[int(np.flatnonzero(req_ids == log.request_id[idx[j]])[0])]
        row = batch["hist_ad_id"][j]
        assert list(row[:len(stored)]) == [a + 1 for a in stored]  # id kind: row = 1 + id
        assert (row[len(stored):] == 0).all()  # padding is 0, only at the end
        cats = batch["hist_category_id"][j]
        assert ((cats == 0) == (row == 0)).all()
    for label in ("click", "conversion", "true_pctr", "true_pcvr"):
        assert batch[label].shape == (idx.shape[0],)


def test_subset_and_max_rows_keep_the_earliest_rows(micro_data: Path):
    log = load_encoded_log(micro_data)
    head = load_encoded_log(micro_data, max_rows=1000)
    assert len(head) == 1000 and head.ts.max() <= log.ts[1000]
    part = log.subset(np.arange(100, 200))
    assert len(part) == 100 and part.sequences is log.sequences
    np.testing.assert_array_equal(part.batch(slice(0, 5))["hist_ad_id"],
                                  log.batch(slice(100, 105))["hist_ad_id"])


def test_open_marketplace_reads_catalog_summary_and_schema(micro_data: Path):
    market = open_marketplace(micro_data)
    assert market.ads["ad_id"].shape == (2_000,)
    assert set(market.ads["bid_type"]) <= {"cpc", "ocpa"}
    ocpa = market.ads["bid_type"] == "ocpa"
    assert (market.ads["target_cpa_micros"][ocpa] > 0).all()
    assert (market.ads["bid_micros"][ocpa] == 0).all()
    assert (market.ads["bid_micros"][~ocpa] > 0).all()
    assert market.summary["impressions"] > 0 and market.schema.sha256 == load_schema().sha256
    assert "daily_budget_micros" in market.campaigns
