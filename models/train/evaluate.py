"""`cascade eval`: every model beside the oracle, on the bundle's recorded test split.

The oracle row uses the simulator's true probabilities, so a model's gap to it is the part of
the signal it failed to learn, and CVR fidelity (Spearman of predicted vs true pCVR over all
impressions) shows sample-selection bias without label noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import Bundle, load_model, read_bundle
from models.data.dataset import EncodedLog, load_encoded_log
from models.nn import Qscore
from models.train.loop import predict
from models.train.metrics import auc, calibration, gauc, logloss, recall_at_k, spearman
from models.train.split import split_from_dict

CTR_MODELS = ("din_esmm", "base", "dqm", "dqm_rocket", "qscore")
CVR_MODELS = ("din_esmm", "cvr_base")
RECALL_KS = (100, 500, 1000)


def ctr_metrics(click: np.ndarray, pctr: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {"ctr_auc": auc(click, pctr), "ctr_gauc": gauc(click, pctr, users),
            "logloss": logloss(click, pctr), "calibration": calibration(click, pctr)}


def cvr_metrics(click: np.ndarray, conversion: np.ndarray, pcvr: np.ndarray,
                true_pcvr: np.ndarray) -> dict[str, float]:
    clicked = click > 0
    out = {"cvr_auc": auc(conversion[clicked], pcvr[clicked]),
           "cvr_calibration": calibration(conversion[clicked], pcvr[clicked])}
    known = ~np.isnan(true_pcvr)
    out["cvr_fidelity"] = spearman(pcvr[known], true_pcvr[known]) if known.any() else float("nan")
    return out


def _rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or np.isnan(v) else round(float(v), 5))
            for k, v in metrics.items()}


def _qscore_pctr(bundle: Bundle, ad_ids: np.ndarray) -> np.ndarray:
    entry = bundle.model_entry("qscore")
    prior = Qscore.from_dict(entry["prior"])
    counts = bundle.arrays(entry["file"])
    order = np.argsort(counts["ad_ids"])
    pos = np.searchsorted(counts["ad_ids"], ad_ids, sorter=order).clip(0, len(order) - 1)
    rows = order[pos]
    known = counts["ad_ids"][rows] == ad_ids
    imps = np.where(known, counts["impressions"][rows], 0)
    clicks = np.where(known, counts["clicks"][rows], 0)
    return prior.score(imps, clicks).astype(np.float32)


def two_tower_recall(bundle: Bundle, model: torch.nn.Module, log: EncodedLog, idx: np.ndarray,
                     max_requests: int = 2000, seed: int = 0) -> dict[str, float]:
    """recall@K of clicked ads: each sampled test request's user vector searches the catalog."""
    clicked = idx[log.click[idx] > 0]
    if len(clicked) == 0:
        return {f"recall@{k}": float("nan") for k in RECALL_KS}
    requests = np.unique(log.request_id[clicked])
    rng = np.random.default_rng(seed)
    if len(requests) > max_requests:
        requests = np.sort(rng.choice(requests, max_requests, replace=False))
    pairs = clicked[np.isin(log.request_id[clicked], requests)]
    first = np.unique(log.request_id[pairs], return_index=True)[1]
    query_rows = pairs[first]  # one impression per request carries its user + history
    users = predict(model, lambda m, b: {"u": m.user_vector(b)}, log, query_rows, 1024, "cpu")["u"]
    vectors = bundle.arrays(bundle.model_entry("two_tower")["ad_vectors"])
    matrix, ad_ids = vectors["vectors"], vectors["ad_ids"]
    kmax = min(max(RECALL_KS), len(ad_ids))
    top = np.empty((len(users), kmax), dtype=np.int64)
    for start in range(0, len(users), 256):
        scores = users[start:start + 256] @ matrix.T
        part = np.argpartition(-scores, kmax - 1, axis=1)[:, :kmax]
        order = np.take_along_axis(scores, part, 1).argsort(axis=1)[:, ::-1]
        top[start:start + 256] = ad_ids[np.take_along_axis(part, order, 1)]
    query_of = np.searchsorted(log.request_id[query_rows], log.request_id[pairs])
    return {f"recall@{k}": recall_at_k(top, query_of, log.ad_id[pairs], k) for k in RECALL_KS}


def evaluate(data_dir: str | Path, bundle_path: str | Path) -> dict[str, Any]:
    """The metrics JSON of ARCHITECTURE.md for every model present in the bundle."""
    bundle = read_bundle(bundle_path)
    log = load_encoded_log(data_dir, bundle.schema)
    split = split_from_dict(bundle.manifest["split"])
    _, _, test = split.indices(log)
    if len(test) == 0:
        raise ValueError(f"{data_dir}: no rows fall in the bundle's test split "
                         f"({split.to_dict()}); is this the data it was trained on?")
    click, conversion = log.click[test], log.conversion[test]
    users, true_pctr, true_pcvr = log.user_id[test], log.true_pctr[test], log.true_pcvr[test]
    result: dict[str, Any] = {"rows": int(len(test)), "bundle": bundle.version,
                              "split": split.kind, "models": {}}
    result["oracle"] = _oracle(click, conversion, users, true_pctr, true_pcvr)
    learnable = (log.true_pctr_learnable, log.true_pcvr_learnable)
    if learnable[0] is not None and learnable[1] is not None:
        result["oracle_learnable"] = _oracle(click, conversion, users, learnable[0][test],
                                             learnable[1][test])
    for name in bundle.manifest["models"]:
        if name == "qscore":
            metrics = ctr_metrics(click, _qscore_pctr(bundle, log.ad_id[test]), users)
        else:
            model = load_model(bundle, name)
            if name == "two_tower":
                metrics = two_tower_recall(bundle, model, log, test)
            else:
                out = predict(model, lambda m, b: m.predict(b) if hasattr(m, "predict")
                              else {"pctr": torch.sigmoid(m(b))}, log, test, 8192, "cpu")
                metrics = {}
                if name in CTR_MODELS:
                    metrics |= ctr_metrics(click, out["pctr"], users)
                if name in CVR_MODELS:
                    metrics |= cvr_metrics(click, conversion, out["pcvr"], true_pcvr)
                if name == "din_esmm":
                    metrics["ctcvr_auc"] = auc(click * conversion, out["pctcvr"])
        result["models"][name] = _rounded(metrics)
    result["gaps"] = gaps(result)
    return result


def _oracle(click: np.ndarray, conversion: np.ndarray, users: np.ndarray,
            pctr: np.ndarray, pcvr: np.ndarray) -> dict[str, float | None]:
    """The model metrics computed from true probabilities (empty when the data has none)."""
    if np.isnan(pctr).all():
        return {}
    oracle = ctr_metrics(click, pctr, users)
    oracle |= cvr_metrics(click, conversion, pcvr, pcvr)
    oracle["ctcvr_auc"] = auc(click * conversion, pctr * pcvr)
    return _rounded(oracle)


GAP_KEYS = ("ctr_auc", "ctr_gauc", "cvr_auc", "ctcvr_auc")


def gaps(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Each model's shortfall (reference minus model) against every oracle present:
    `oracle` knows each ad's private appeal; `oracle_learnable` has it integrated out, so its
    gap is the part of the signal a model could still learn."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for ref in ("oracle", "oracle_learnable"):
        truth = result.get(ref) or {}
        for name, metrics in result["models"].items():
            row = {k: round(truth[k] - metrics[k], 5) for k in GAP_KEYS
                   if truth.get(k) is not None and metrics.get(k) is not None}
            if row:
                out.setdefault(name, {})[ref] = row
    return out
