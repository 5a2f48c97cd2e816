"""Training publishes a verified bundle; eval reports every model beside the oracle on the
bundle's recorded test split, in the contract's JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from models.bundle import read_bundle
from models.data.dataset import load_encoded_log
from models.train.evaluate import evaluate, load_model
from models.train.split import TimeSplit, split_from_dict, time_split
from models.train.trainer import ALL_MODELS, parse_models

CASCADE = [sys.executable, "-m", "cli.main"]


@pytest.fixture(scope="module")
def trained(default_bundle):
    """Every model, trained with the default flags on tiny through the real `cascade train`
    (tests/fixtures_bundle.py; the stack test serves the same bundle)."""
    return default_bundle


@pytest.fixture(scope="module")
def metrics(tiny_data, trained):
    return evaluate(tiny_data, trained)


def test_time_split_orders_train_before_valid_before_test():
    ts = np.arange(1000, dtype=np.int64)
    split = time_split(ts)
    train, valid, test = split.indices(ts)
    assert ts[train].max() < ts[valid].min() and ts[valid].max() < ts[test].min()
    # exact shares: the cut is not a truncated quantile (which gave 799 / 101 / 100)
    assert (len(train), len(valid), len(test)) == (800, 100, 100)
    assert TimeSplit.from_dict(split.to_dict()) == split
    assert split_from_dict(split.to_dict()) == split


@pytest.mark.slow
def test_bundle_records_split_models_and_vectors(trained):
    bundle = read_bundle(trained)
    manifest = bundle.manifest
    assert set(manifest["models"]) == set(ALL_MODELS)
    assert manifest["split"]["rows"]["test"] > 0
    vectors = bundle.arrays(manifest["models"]["two_tower"]["ad_vectors"])
    assert vectors["vectors"].shape[0] == vectors["ad_ids"].shape[0]
    assert np.allclose(np.linalg.norm(vectors["vectors"], axis=1), 1.0, atol=1e-4)
    assert manifest["index"]["recall_at_k"] >= 0.95
    assert manifest["models"]["qscore"]["prior"]["kind"] == "beta_prior_ctr"
    # simulated data: each CVR head's validation Spearman against the true pCVR is recorded
    for name in ("din_esmm", "cvr_base"):
        assert -1.0 <= manifest["models"][name]["metrics"]["valid_cvr_fidelity"] <= 1.0
    assert manifest["models"]["din_esmm"]["metrics"]["valid_cvr_fidelity"] > 0.0


def test_exported_towers_reproduce_training_scores(tiny_data, trained):
    """The bundle's ad-vector matrix equals the ad tower run on the logged rows."""
    import torch

    bundle = read_bundle(trained)
    model = load_model(bundle, "two_tower")
    log = load_encoded_log(tiny_data, bundle.schema, max_rows=512)
    batch = {k: torch.from_numpy(v) for k, v in log.batch(np.arange(len(log))).items()
             if k in bundle.schema}
    with torch.inference_mode():
        live = model.ad_vector(batch).numpy()
    stored = bundle.arrays(bundle.model_entry("two_tower")["ad_vectors"])
    row = {int(a): i for i, a in enumerate(stored["ad_ids"])}
    exported = stored["vectors"][[row[int(a)] for a in log.ad_id]]
    np.testing.assert_allclose(live, exported, atol=1e-5)


def test_published_rankers_are_calibrated_on_the_validation_rows(tiny_data, trained):
    """The fitted level is folded into the towers: on the validation rows the mean pCTR is the
    click rate and the mean pCVR over clicks the conversion rate (the intercept's likelihood
    equation), and the manifest records each head's (a, b)."""
    import torch

    from models.train.loop import predict
    from models.train.trainer import split_of

    bundle = read_bundle(trained)
    entry = bundle.model_entry("din_esmm")
    assert set(entry["calibration"]) == {"ctr", "cvr"} and entry["calibration"]["ctr"][0] > 0
    log = load_encoded_log(tiny_data, bundle.schema)
    _, valid, _ = split_of(bundle.manifest).indices(log)
    out = predict(load_model(bundle, "din_esmm"), lambda m, b: m.predict(b), log, valid, 8192,
                  torch.device("cpu"))
    assert out["pctr"].mean() / log.click[valid].mean() == pytest.approx(1.0, abs=0.01)
    if entry["calibration"]["cvr"][1] != 0.0:  # fitted (enough validation conversions)
        clicked = log.click[valid] > 0
        assert out["pcvr"][clicked].mean() / log.conversion[valid][clicked].mean() == \
            pytest.approx(1.0, abs=0.01)



def test_the_published_ranker_serves_the_counted_ad_offsets_at_their_fitted_weight(
        tiny_data, trained):
    """Each head's third calibration number c >= 0 is the weight of the ads' counted log-odds
    (training rows only) that the published DIN+ESMM adds to its logit."""
    import torch

    from models.train.calibrate import count_offsets
    from models.train.trainer import split_of

    bundle = read_bundle(trained)
    entry = bundle.model_entry("din_esmm")
    log = load_encoded_log(tiny_data, bundle.schema)
    train, _, _ = split_of(bundle.manifest).indices(log)
    counted = count_offsets(log.features["ad_id"][train], log.click[train],
                            log.conversion[train], bundle.schema["ad_id"].rows)
    served = load_model(bundle, "din_esmm").ad_offsets.offsets
    for column, head in enumerate(("ctr", "cvr")):
        weight = entry["calibration"][head][2]
        assert weight >= 0.0
        want = (weight * counted[column]).float()
        want[0] = 0.0
        torch.testing.assert_close(served[:, column], want, atol=1e-5, rtol=1e-4)

def test_eval_has_the_contract_keys(metrics):
    ctr_keys = {"ctr_auc", "ctr_gauc", "logloss", "calibration"}
    cvr_keys = {"cvr_auc", "cvr_fidelity", "cvr_calibration"}
    models = metrics["models"]
    for name in ("din_esmm", "base", "dqm", "qscore"):
        assert ctr_keys <= set(models[name]), name
    for name in ("din_esmm", "cvr_base"):
        assert cvr_keys <= set(models[name]), name
    assert "ctcvr_auc" in models["din_esmm"]
    assert {"recall@100", "recall@500", "recall@1000"} <= set(models["two_tower"])
    assert ctr_keys | cvr_keys | {"ctcvr_auc"} <= set(metrics["oracle"])


def test_short_training_learns_the_signal(metrics):
    """A brief run on tiny must beat chance clearly; the oracle bounds it from above."""
    models, oracle = metrics["models"], metrics["oracle"]
    assert models["din_esmm"]["ctr_auc"] > 0.6
    assert models["din_esmm"]["ctr_auc"] <= oracle["ctr_auc"] + 0.02
    assert models["qscore"]["ctr_auc"] > 0.55
    assert models["din_esmm"]["cvr_auc"] > 0.6
    assert models["two_tower"]["recall@1000"] > 1000 / 5000 * 1.5  # well above random


def test_eval_cli_writes_json_and_prints_a_table(tiny_data, trained, tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run(CASCADE + ["eval", "--data", str(tiny_data), "--bundle",
                                     str(trained), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out.read_text())["models"]) >= {"din_esmm", "two_tower"}
    assert "oracle" in proc.stdout and "din_esmm" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/nonexistent", "--out", "/tmp/x"], "data directory not found"),
        (["train", "--data", ".", "--out", "/tmp/x", "--models", "din,foo"], "unknown model"),
        (["eval", "--data", ".", "--bundle", "/nonexistent", "--out", "/tmp/x"],
         "not found"),
    ],
)
def test_cli_errors_are_one_line(args, message, tiny_data):
    if "--models" in args:
        args[2] = str(tiny_data)
    proc = subprocess.run(CASCADE + args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_parse_models():
    assert parse_models(None) == ALL_MODELS
    assert parse_models("dqm, din_esmm") == ("dqm", "din_esmm")
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("dqm,nope")
