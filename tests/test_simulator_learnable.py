"""The learnable oracle: the true probabilities with each ad's private appeal residual
integrated out over its prior. It equals the oracle when no appeal is private, ranks below it
otherwise, and stays calibrated (integrated, not zeroed)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from models.data import layout
from models.data.sim_config import apply_overrides
from models.data.simulator import simulate
from tests.fixtures_data import DATA_SEED, micro_config


def _impressions(path):
    return pq.read_table(path / layout.IMPRESSIONS_DIR).to_pydict()


def test_learnable_oracle_equals_the_oracle_when_no_appeal_is_private(tmp_path):
    cfg = apply_overrides(micro_config(), {"click": {"appeal_advertiser_share": 0.6,
                                                     "appeal_campaign_share": 0.4}}).validate()
    summary = simulate(cfg, DATA_SEED, tmp_path / "shared")
    imp = _impressions(tmp_path / "shared")
    np.testing.assert_array_equal(imp["true_pctr_learnable"], imp["true_pctr"])
    np.testing.assert_array_equal(imp["true_pcvr_learnable"], imp["true_pcvr"])
    assert summary["oracle_learnable"]["ctr_auc"] == summary["oracle"]["ctr_auc"]


def test_learnable_oracle_ranks_below_the_oracle_and_stays_calibrated(micro_data):
    imp = _impressions(micro_data)
    pctr, learnable = np.array(imp["true_pctr"]), np.array(imp["true_pctr_learnable"])
    assert not np.array_equal(pctr, learnable)
    # integrating out a zero-mean residual keeps the mean probability (zeroing it would not)
    assert abs(learnable.mean() / pctr.mean() - 1) < 0.02
    summary = __import__("json").loads((micro_data / layout.SUMMARY_FILE).read_text())
    assert summary["oracle_learnable"]["ctr_auc"] < summary["oracle"]["ctr_auc"]
    assert summary["oracle_learnable"]["ctr_auc"] > 0.6
