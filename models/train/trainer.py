"""`cascade train`: every model on one time split, written into one new bundle.

The trainer returns an uncommitted `BundleWriter`, so the caller can add serving artefacts built
from the trained vectors (the faiss index lives in `services/retrieval`, which `models` never
imports) before the bundle is published atomically.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import (
    CAMPAIGNS_FILE,
    CATALOG_FILE,
    COLD_START_FILE,
    QSCORE_COUNTS_FILE,
    BundleWriter,
    ad_vectors_file,
    weights_file,
)
from models.data import layout
from models.data.dataset import EncodedLog, dataset_schema, load_encoded_log, open_marketplace
from models.features import FeatureSchema
from models.nn import Qscore, build_model, default_config, estimate_log_q
from models.pricing import PRIOR_CVR, qscore_ecpm
from models.train.calibrate import count_offsets, fit_blend, fold_into_output, logits_of
from models.train.loop import Batch, FitConfig, Progress, fit, predict
from models.train.metrics import auc, gauc, spearman
from models.train.rare_ids import RareIds, RareIdSource
from models.train.rocket import RocketConfig, RocketPair
from models.train.split import Split, choose_split, split_from_dict
from models.train.teacher import RankerTeacher

NEURAL_MODELS = ("two_tower", "dqm", "din_esmm", "base", "cvr_base")
# `dqm_rocket`: DQM trained jointly with DIN+ESMM (models/train/rocket.py), beside the plain
# `dqm` (its baseline). When trained it is the bundle's pre-ranker: manifest["prerank_model"].
ROCKET = "dqm_rocket"
ALL_MODELS = ("two_tower", "dqm", "din_esmm", "qscore", "base", "cvr_base", ROCKET)
# Training order: the ranker first, since the Rocket pair is compared with it and the
# two-tower distils it.
TRAIN_ORDER = ("qscore", "din_esmm", ROCKET, "dqm", "two_tower", "base", "cvr_base")
# The bundle's file names live in models.bundle (serving reads them without this module);
# re-exported here for callers that still import them from the trainer.
__all__ = ["ALL_MODELS", "CAMPAIGNS_FILE", "CATALOG_FILE", "COLD_START_FILE", "NEURAL_MODELS",
           "QSCORE_COUNTS_FILE", "TrainOptions", "ad_vectors_file", "parse_models", "train",
           "weights_file"]


@dataclass
class TrainOptions:
    """What to train and how long; defaults fit `small` in the 20-minute CPU budget."""

    models: tuple[str, ...] = ALL_MODELS
    fit: FitConfig = field(default_factory=FitConfig)
    mba_lambda: float = 1e-5
    # Ids seen fewer times than this in training share one row per table (0/1: off).
    min_id_count: int = 0
    # Rankers keep their best point by validation AUC (CTR; CVR on clicks for cvr_base)
    # rather than validation loss.
    stop_on_auc: bool = True
    # Fit each ranker head's level (logit a*z + b) on the validation rows after training,
    # and DIN+ESMM's per-ad offsets' weight c beside it (off: no offsets are served).
    calibrate: bool = True
    # Per-model config overrides (JSON fields of the model's config), e.g. from a tuning run.
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_rows: int | None = None  # read at most this many (earliest) impressions
    device: str | None = None  # None: CUDA when present, else CPU
    rocket: RocketConfig = field(default_factory=RocketConfig)

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_models(spec: str | None) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), validated; None or 'all' -> every model."""
    if not spec or spec == "all":
        return ALL_MODELS
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown or not names:
        raise ValueError(f"--models: unknown model(s) {unknown} (choose from {list(ALL_MODELS)})")
    return names


def encode_catalog(schema: FeatureSchema, ads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encode the ad group of the catalog, row-aligned with `ads['ad_id']`."""
    return {f.name: f.encode(ads[f.name]) for f in schema.group("ad")}


CLICKED_ONLY = ("two_tower", "cvr_base")
# The heads each ranker's published weights are calibrated on (models.train.calibrate).
CALIBRATED = {"din_esmm": ("ctr", "cvr"), "base": ("ctr",), "cvr_base": ("cvr",)}
# The two-tower's sampled softmax corrects by each ad's sampling probability, per raw ad id.
RARE_ID_MODELS = ("dqm", "din_esmm", "base", "cvr_base", ROCKET)


def _fit_config(name: str, base: FitConfig) -> FitConfig:
    """Models trained on clicked impressions see ~40x fewer rows than the click models: the
    same batch size would give them a few steps per epoch. They take smaller batches; the
    epoch and step budgets and early stopping are the same."""
    if name not in CLICKED_ONLY:
        return base
    return replace(base, batch_size=max(256, base.batch_size // 4))


def _step_loss(name: str, lam: float) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model.training_loss(batch) + model.mba_l2(batch, lam)

    step.__name__ = f"{name}_loss"
    return step


class _WithLogQ:
    """Batch source for the two-tower: positives plus each ad's log sampling probability."""

    def __init__(self, log: EncodedLog, log_q: np.ndarray):
        self.log, self.log_q = log, log_q

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = self.log.batch(idx)
        out["log_q"] = self.log_q[out["ad_id"]]
        return out


def _validation_metrics(name: str, model: torch.nn.Module, log: EncodedLog,
                        idx: np.ndarray, device: torch.device, batch_size: int) -> dict[str, float]:
    """Quick figures for the manifest; `cascade eval` computes the full set on test rows."""
    if name == "two_tower" or len(idx) == 0:
        return {}
    out = predict(model, lambda m, b: m.predict(b), log, idx, batch_size * 4, device)
    metrics: dict[str, float] = {}
    if "pctr" in out:
        metrics["valid_ctr_auc"] = auc(log.click[idx], out["pctr"])
        metrics["valid_ctr_gauc"] = gauc(log.click[idx], out["pctr"], log.user_id[idx])
    if "pcvr" in out:
        clicked = log.click[idx] > 0
        if clicked.any():
            metrics["valid_cvr_auc"] = auc(log.conversion[idx][clicked], out["pcvr"][clicked])
        truth = log.true_pcvr[idx]
        known = ~np.isnan(truth)  # simulated data: how well pCVR orders the true one
        if known.any():
            metrics["valid_cvr_fidelity"] = spearman(out["pcvr"][known], truth[known])
    return {k: round(float(v), 5) for k, v in metrics.items()}


def _valid_score(name: str, source: Any, log: EncodedLog, device: torch.device
                 ) -> Callable[[torch.nn.Module, np.ndarray], float] | None:
    """Validation AUC of a ranker's main head (None for the two-tower: recall is its metric)."""
    if name == "two_tower":
        return None

    def score(model: torch.nn.Module, idx: np.ndarray) -> float:
        out = predict(model, lambda m, b: m.predict(b), source, idx, 8192, device)
        if name == "cvr_base":
            clicked = log.click[idx] > 0
            return auc(log.conversion[idx][clicked], out["pcvr"][clicked])
        value = auc(log.click[idx], out["pctr"])
        if name in ("din_esmm", ROCKET):  # both heads: the CVR tower must not be sacrificed
            value += auc(log.click[idx] * log.conversion[idx], out["pctcvr"])
        if name == ROCKET:  # the pair: the booster's heads and the light net's CTR
            value += auc(log.click[idx], out["dqm_pctr"])
        return value

    return score


def _ad_vectors(model: torch.nn.Module, catalog: dict[str, np.ndarray],
                device: torch.device, block: int = 65536) -> np.ndarray:
    model.eval()
    n = next(iter(catalog.values())).shape[0]
    parts = []
    with torch.inference_mode():
        for start in range(0, n, block):
            batch = {k: torch.from_numpy(v[start:start + block]).to(device)
                     for k, v in catalog.items()}
            parts.append(model.ad_vector(batch).float().cpu().numpy())
    return np.concatenate(parts).astype(np.float32)


@dataclass
class _Run:
    """One training run's shared inputs; `fit_one` trains one network on its rows."""

    schema: FeatureSchema
    options: TrainOptions
    log: EncodedLog
    train_idx: np.ndarray
    valid_idx: np.ndarray
    device: torch.device
    progress: Progress | None
    base_rates: tuple[float, float]

    def build(self, name: str) -> torch.nn.Module:
        """Seeded before building: the initial weights are the first random draw of a run."""
        torch.manual_seed(self.options.fit.seed)
        config = default_config(name).to_dict() | self.options.configs.get(name, {})
        model = build_model(name, self.schema, config)
        if hasattr(model, "init_base_rates"):
            model.init_base_rates(*self.base_rates)
        return model

    def fit_one(self, name: str, teacher: RankerTeacher | None = None
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
        log, opts = self.log, self.options
        model = self.build(name)
        source: Any = log
        tr, va = self.train_idx, self.valid_idx
        if name in CLICKED_ONLY:  # BASE of ESMM; the two-tower's positives
            tr, va = tr[log.click[tr] > 0], va[log.click[va] > 0]
        if name == "two_tower":  # other rows of the batch are the negatives
            owner = self.schema["ad_id"]
            counts = estimate_log_q(torch.from_numpy(log.features["ad_id"][tr]), owner.rows)
            source = _WithLogQ(log, counts.numpy())
            if teacher is not None and getattr(model.config, "distill_weight", 0) > 0:
                source = teacher.source(source, model.config.distill_candidates,
                                        opts.fit.seed)
        return model, self.fit(name, model, source, tr, va)

    def fit(self, name: str, model: torch.nn.Module, source: Any, tr: np.ndarray,
            va: np.ndarray, score_as: str | None = None) -> dict[str, Any]:
        """Fit (rare ids folded when asked for) and describe the result for the manifest."""
        opts, log = self.options, self.log
        rare = None
        if name in RARE_ID_MODELS and opts.min_id_count > 1:
            rare = RareIds.fit(self.schema, log, tr, opts.min_id_count)
            source = RareIdSource(source, rare)
        score = (_valid_score(score_as or name, source, log, self.device)
                 if opts.stop_on_auc else None)
        result = fit(model, _step_loss(name, opts.mba_lambda), source, tr, va,
                     _fit_config(name, opts.fit), self.device, self.progress, name, score)
        if rare is not None:
            for part in getattr(model, "parts", lambda: (model,))():
                rare.export(part)
        return {
            "best_epoch": result.best_epoch,
            "best_step": result.best_step,
            "steps": result.steps,
            "history": result.history,
            "train_rows": int(len(tr)),
            "rare_ids": None if rare is None else {"min_count": rare.min_count,
                                                   "rows": rare.summary()},
        }

    def metrics(self, name: str, model: torch.nn.Module) -> dict[str, float]:
        return _validation_metrics(name, model, self.log, self.valid_idx, self.device,
                                   self.options.fit.batch_size)

    def calibrate(self, name: str, model: torch.nn.Module) -> dict[str, list[float]]:
        """Fit each head's level on the validation rows and fold it into the tower
        (`models.train.calibrate`); the fitted (a, b) per head go to the manifest. A model
        with `AdOffsets` also gets each head's weight c on the ads' counted log-odds
        (a third number per head), and serves c x those log-odds as its offsets."""
        heads = CALIBRATED.get(name, ())
        idx = self.valid_idx
        if not heads or not self.options.calibrate or len(idx) == 0:
            return {}
        counted = None
        if getattr(model, "ad_offsets", None) is not None:
            model.ad_offsets.offsets.zero_()  # the blend is fitted on the network's own logits
            counted = self.counted_offsets
        out = predict(model, lambda m, b: m.predict(b), self.log, idx,
                      self.options.fit.batch_size * 4, self.device)
        clicked = self.log.click[idx] > 0
        # head -> (its rows among idx, their labels, fit the scale too?)
        rows = {"ctr": (slice(None), self.log.click[idx], True),
                "cvr": (clicked, self.log.conversion[idx][clicked], False)}
        fitted: dict[str, list[float]] = {}
        for head in heads:
            where, labels, scale = rows[head]
            prior = None if counted is None else counted[head].numpy()[
                self.log.features["ad_id"][idx][where]]
            a, b, c = fit_blend(logits_of(out["p" + head][where]), labels, prior, scale=scale)
            fold_into_output(getattr(model, f"{head}_tower"), a, b)
            fitted[head] = [round(a, 6), round(b, 6)]
            if counted is not None:
                model.set_ad_offsets(head, c * counted[head])
                fitted[head].append(round(c, 6))
        return fitted

    @cached_property
    def counted_offsets(self) -> dict[str, torch.Tensor]:
        """Per head, each ad-id row's counted log-odds over the training rows
        (`count_offsets`): the prior `calibrate` weighs, the same for every ranker."""
        tr = self.train_idx
        return dict(zip(("ctr", "cvr"), count_offsets(
            self.log.features["ad_id"][tr], self.log.click[tr], self.log.conversion[tr],
            self.schema["ad_id"].rows), strict=True))

    def ranker_score(self, model: torch.nn.Module) -> float:
        """DIN+ESMM's validation score (CTR AUC + CTCVR AUC) on the whole validation split."""
        score = _valid_score("din_esmm", self.log, self.log, self.device)
        return round(float(score(model, self.valid_idx)), 6) if score else float("nan")


def _publish(writer: BundleWriter, name: str, model: torch.nn.Module, entry: dict[str, Any],
             catalog: dict[str, np.ndarray], ad_ids: np.ndarray, info: dict[str, Any],
             run: _Run | None = None) -> None:
    """Save weights (+ ad vectors for the served two-tower and DQM) and the manifest entry;
    a ranker's heads are calibrated on the validation rows first (`_Run.calibrate`)."""
    if run is not None and name in CALIBRATED and "calibration" not in entry:
        entry = {**entry, "calibration": run.calibrate(name, model)}
    writer.save_tensors(weights_file(name), model.state_dict())
    entry = {"file": weights_file(name), "config": model.config.to_dict(), **entry}
    if "metrics" not in entry and run is not None:
        entry["metrics"] = run.metrics(name, model)
    if name in ("two_tower", "dqm", ROCKET):
        vectors = _ad_vectors(model, catalog, next(model.parameters()).device)
        writer.save_arrays(ad_vectors_file(name), {"vectors": vectors, "ad_ids": ad_ids})
        entry["ad_vectors"] = ad_vectors_file(name)
        info["vectors"][name] = vectors
    writer.add_model(name, entry)


def _train_rocket(run: _Run, writer: BundleWriter, ranker: torch.nn.Module | None,
                  catalog: dict[str, np.ndarray], ad_ids: np.ndarray,
                  info: dict[str, Any]) -> torch.nn.Module:
    """Train DQM jointly with a fresh DIN+ESMM; publish the DQM as `dqm_rocket`, the
    bundle's pre-ranker (manifest["prerank_model"]).

    The pair's booster shares its tables with the DQM, which may change its AUC: when a
    separately trained DIN+ESMM (`ranker`) exists, the better of the two by validation score
    is published as `din_esmm` (the DQM follows its own booster either way). Returns the
    DIN+ESMM that was published (the two-tower's teacher).
    """
    booster, light = run.build("din_esmm"), run.build("dqm")
    pair = RocketPair(booster, light, run.options.rocket)
    entry = run.fit(ROCKET, pair, run.log, run.train_idx, run.valid_idx, score_as=ROCKET)
    # calibrated (and blended with the ads' counts) like the separate ranker before comparing
    calibration = run.calibrate("din_esmm", booster) if "din_esmm" in run.options.models else {}
    shared_score = run.ranker_score(booster)
    separate_score = run.ranker_score(ranker) if ranker is not None else None
    use_shared = separate_score is None or shared_score > separate_score
    rocket = {"hint_weight": run.options.rocket.hint_weight,
              "share_embeddings": run.options.rocket.share_embeddings,
              "din_esmm_valid_score": {"separate": separate_score, "rocket_shared": shared_score},
              "din_esmm_published": "rocket_shared" if use_shared else "separate"}
    _publish(writer, ROCKET, light, {**entry, "training": "rocket", "rocket": rocket,
                                     "metrics": run.metrics("dqm", light)},
             catalog, ad_ids, info)
    writer.manifest["prerank_model"] = ROCKET
    if use_shared and "din_esmm" in run.options.models:
        _publish(writer, "din_esmm", booster, {**entry, "training": "rocket", "rocket": rocket,
                                               "calibration": calibration},
                 catalog, ad_ids, info, run)
    writer.manifest["rocket"] = rocket
    return booster if use_shared or ranker is None else ranker


def train(data_dir: str | Path, out_root: str | Path, options: TrainOptions,
          progress: Progress | None = None) -> tuple[BundleWriter, dict[str, Any]]:
    """Train the requested models and stage a bundle (the caller commits it).

    `info`: "vectors" (model -> ad vectors), "ad_ids" (their rows), "user_queries" (sample
    two-tower user vectors) and, with qscore, "cold_ecpm" (each ad's Qscore eCPM estimate,
    row-aligned with "ad_ids": the value of a value-aware index)."""
    started = time.time()
    data_dir = layout.require_dataset(data_dir)
    schema = dataset_schema(data_dir)
    device = options.resolved_device()
    log = load_encoded_log(data_dir, schema, max_rows=options.max_rows)
    split = choose_split(log)
    train_idx, valid_idx, _ = split.indices(log)
    market = open_marketplace(data_dir)
    catalog = encode_catalog(schema, market.ads)
    writer = BundleWriter(out_root, schema)
    info: dict[str, Any] = {"vectors": {}}
    base_ctr = float(log.click[train_idx].mean())
    clicked = log.click[train_idx] > 0
    base_cvr = float(log.conversion[train_idx][clicked].mean()) if clicked.any() else PRIOR_CVR
    try:
        run = _Run(schema, options, log, train_idx, valid_idx, device, progress,
                   (base_ctr, base_cvr))
        ranker: torch.nn.Module | None = None
        for name in [n for n in TRAIN_ORDER if n in options.models]:
            if name == "qscore":
                entry, priors, info["cold_ecpm"] = _train_qscore(writer, log, train_idx,
                                                                  market.ads)
                writer.add_model("qscore", entry)
                writer.manifest["priors"] = priors
                continue
            if name == ROCKET:
                ranker = _train_rocket(run, writer, ranker, catalog, market.ads["ad_id"], info)
                continue
            teacher = None
            if name == "two_tower" and ranker is not None:
                teacher = RankerTeacher(ranker, catalog, device)
            model, entry = run.fit_one(name, teacher)
            if name == "din_esmm":
                ranker = model
            _publish(writer, name, model, entry, catalog, market.ads["ad_id"], info, run)
            if name == "two_tower":
                clicked_valid = valid_idx[log.click[valid_idx] > 0]
                info["user_queries"] = _user_queries(model, log, clicked_valid, device)
        shutil.copyfile(data_dir / layout.ADS_FILE, writer.path(CATALOG_FILE))
        if (data_dir / layout.CAMPAIGNS_FILE).is_file():
            shutil.copyfile(data_dir / layout.CAMPAIGNS_FILE, writer.path(CAMPAIGNS_FILE))
        writer.manifest.update(
            split=split.to_dict(log),
            data={"path": str(data_dir), "rows": len(log),
                  "summary": {k: market.summary.get(k) for k in ("ads", "users", "impressions")}},
            training={"device": str(device), "fit": asdict(options.fit),
                      "mba_lambda": options.mba_lambda, "seconds": round(time.time() - started, 1),
                      "torch": torch.__version__},
        )
        info["ad_ids"] = market.ads["ad_id"]
    except BaseException:
        writer.abort()
        raise
    return writer, info


def _train_qscore(writer: BundleWriter, log: EncodedLog, train_idx: np.ndarray,
                  ads: dict[str, np.ndarray],
                  ) -> tuple[dict[str, Any], dict[str, float], np.ndarray]:
    """Empirical-Bayes prior from training counts; the counts seed the online counters.

    Also writes each ad's Qscore eCPM estimate, the order of retrieval's cold-start channel
    (1000 x posterior CTR x click value, where an oCPA click is worth target CPA x prior CVR)
    and the value a value-aware index weights by; returned too, row-aligned with `ads`.
    """
    ad_ids = ads["ad_id"].astype(np.int64)
    order = np.argsort(ad_ids)
    pos = order[np.searchsorted(ad_ids, log.ad_id[train_idx], sorter=order)]
    impressions = np.bincount(pos, minlength=len(ad_ids)).astype(np.int64)
    clicks = np.bincount(pos, weights=log.click[train_idx], minlength=len(ad_ids)).astype(np.int64)
    prior = Qscore.fit(impressions, clicks)
    clicked = log.click[train_idx] > 0
    prior_cvr = float(log.conversion[train_idx][clicked].mean()) if clicked.any() else PRIOR_CVR
    writer.save_arrays(QSCORE_COUNTS_FILE, {"ad_ids": ad_ids, "impressions": impressions,
                                            "clicks": clicks})
    qctr = prior.score(impressions, clicks)
    ecpm = qscore_ecpm(qctr, ads["bid_type"] == "ocpa", ads["bid_micros"],
                       ads["target_cpa_micros"], prior_cvr).astype(np.float32)
    writer.save_arrays(COLD_START_FILE, {"ad_ids": ad_ids, "ecpm": ecpm})
    entry = {"file": QSCORE_COUNTS_FILE, "prior": prior.to_dict(),
             "prior_mean": round(prior.prior_mean, 6), "cold_start": COLD_START_FILE}
    return entry, {"ctr": prior.prior_mean, "cvr": prior_cvr}, ecpm


def _user_queries(model: torch.nn.Module, log: EncodedLog, idx: np.ndarray,
                  device: torch.device, n: int = 256) -> np.ndarray:
    """Sample user vectors: the index tunes its search parameter on real queries."""
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False)) if len(idx) else idx
    out = predict(model, lambda m, b: {"u": m.user_vector(b)}, log, pick, 1024, device)
    return out.get("u", np.zeros((0, 1), np.float32))


def split_of(manifest: dict[str, Any]) -> Split:
    return split_from_dict(manifest["split"])
