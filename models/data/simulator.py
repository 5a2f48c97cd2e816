"""The ad-marketplace simulator: requests, impressions, clicks and conversions with their truth.

The request stream is produced in time-ordered chunks (one parquet part each) so memory stays
bounded at any scale. Behaviour sequences must be exact (the sequence as it stood strictly
before each request, as the online store would serve it), yet clicks of one request change the
next request of the same user. Inside a chunk the requests are therefore processed in *waves*:
wave k holds every user's k-th request of the chunk. Users' sequences are independent of each
other, so each wave is one vectorised step and the result equals a request-by-request replay.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.data import layout
from models.data.sim_config import SimConfig
from models.data.sim_market import (
    DEVICES,
    PAD,
    Marketplace,
    build_marketplace,
    sample_interest_ads,
)
from models.features.schema import DEFAULT_SCHEMA_PATH, FeatureSchema, load_schema
from models.train import metrics

ProgressFn = Callable[[int, int], None]
ACTIVATION_BLOCK = 200_000  # impressions per activation block ([block, seq_len] floats)
MS_PER_HOUR = 3_600_000


@dataclass
class Chunk:
    """One time slice of the log, ready to be written as a requests and an impressions part."""

    requests: dict[str, np.ndarray]
    hist: np.ndarray  # [n_requests, seq_len] int32 ad ids, newest first, -1 padded
    impressions: dict[str, np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def local_activation(market: Marketplace, hist: np.ndarray, ad: np.ndarray,
                     temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Attention of a candidate ad over one history: softmax(sim / T)-weighted similarity.

    With a low temperature this is close to the best match among the behaviours, so a single
    relevant recent click matters even inside a long unrelated history; an average over the
    history would wash it out. Returns (activation, has_history).
    """
    valid = hist >= 0
    hist_cat = market.ads["category_id"][np.where(valid, hist, 0)]
    sim = market.category_sim[hist_cat, market.ads["category_id"][ad][:, None]]
    logits = np.where(valid, sim / temperature, -np.inf)
    peak = logits.max(axis=1, keepdims=True)
    has = valid.any(axis=1)
    weights = np.exp(logits - np.where(has[:, None], peak, 0.0))
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    return (weights * np.where(valid, sim, 0.0)).sum(axis=1).astype(np.float32), has


def history_activation(cfg: SimConfig, market: Marketplace, hist: np.ndarray,
                       ad: np.ndarray) -> np.ndarray:
    """Local activation per (history row, ad), in blocks to bound memory; an empty history
    gets the neutral value `activation_center` (no evidence either way)."""
    c = cfg.click
    act = np.empty(ad.shape[0], dtype=np.float32)
    for b in range(0, ad.shape[0], ACTIVATION_BLOCK):
        a, has = local_activation(market, hist[b:b + ACTIVATION_BLOCK],
                                  ad[b:b + ACTIVATION_BLOCK], c.activation_temperature)
        act[b:b + ACTIVATION_BLOCK] = np.where(has, a, c.activation_center)
    return act


def true_logits(cfg: SimConfig, market: Marketplace, user: np.ndarray, ad: np.ndarray,
                scene: np.ndarray, position: np.ndarray, activation: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The hidden click and conversion (given click) logits of impressions.

    Click: scene + position (strictly falling) + ad appeal + alpha * local activation
    + age x price. Conversion shares part of the activation but is driven by price, the ad's
    conversion quality and the user's purchase intent: CTR and CVR correlate but differ.
    """
    c, v = cfg.click, cfg.conversion
    scenes = list(cfg.scenes.values())
    scene_ctr = np.array([s.ctr_base for s in scenes])
    scene_cvr = np.array([s.cvr_base for s in scenes])
    age = (market.users["age_bucket"][user] - 3.5) / 3.5
    price = (market.ads["price_bucket"][ad] - 4.5) / 4.5
    centered = activation - c.activation_center
    ctr = (scene_ctr[scene] - c.position_decay * position + market.ad_appeal[ad]
           + c.activation_weight * centered + c.profile_weight * 2.0 * age * price)
    cvr = (scene_cvr[scene] + v.activation_weight * centered + market.ad_quality[ad]
           - v.price_weight * market.ad_price_z[ad] + market.user_intent[user])
    return ctr, cvr


GAUSS_HERMITE_NODES = 16


def learnable_probabilities(cfg: SimConfig, market: Marketplace, ad: np.ndarray,
                            ctr_logit: np.ndarray, cvr_logit: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's pCTR and pCVR with each ad's private appeal residual integrated out over
    its prior N(0, s^2): what a model that learnt every shared effect could at best know.

    Integrated, not zeroed, so the probabilities stay calibrated (E[sigmoid] is not
    sigmoid(E)). The residual also moves conversion through the quality's correlation with
    appeal, so pCVR is the ratio E[pCTR * pCVR] / E[pCTR] over the same residual. With no
    private share (s = 0) this is exactly the oracle. Gauss-Hermite quadrature."""
    s = market.appeal_private_std
    if s <= 0:
        return _sigmoid(ctr_logit).astype(np.float32), _sigmoid(cvr_logit).astype(np.float32)
    c, v = cfg.click, cfg.conversion
    cvr_slope = v.quality_std * v.quality_appeal_corr / max(c.appeal_std, 1e-9)
    nodes, weights = np.polynomial.hermite_e.hermegauss(GAUSS_HERMITE_NODES)
    weights = weights / weights.sum()
    private = market.ad_appeal_private[ad].astype(np.float64)
    pctr, pctcvr = np.empty(ad.shape[0]), np.empty(ad.shape[0])
    for b in range(0, ad.shape[0], ACTIVATION_BLOCK):
        rows = slice(b, b + ACTIVATION_BLOCK)
        known_ctr = (ctr_logit[rows] - private[rows])[:, None]
        known_cvr = (cvr_logit[rows] - cvr_slope * private[rows])[:, None]
        click = _sigmoid(known_ctr + s * nodes)
        pctr[rows] = click @ weights
        pctcvr[rows] = (click * _sigmoid(known_cvr + cvr_slope * s * nodes)) @ weights
    return pctr.astype(np.float32), (pctcvr / np.maximum(pctr, 1e-30)).astype(np.float32)


def _pick_ads(market: Marketplace, cfg: SimConfig, rng: np.random.Generator,
              user: np.ndarray, scene: np.ndarray) -> np.ndarray:
    """The logging policy: a popularity/bid-biased random pick, or an interest-driven one."""
    n = user.shape[0]
    ad = np.empty(n, dtype=np.int64)
    u = rng.random(n)
    for s in range(len(market.scenes)):
        rows = np.flatnonzero(scene == s)
        ad[rows] = np.searchsorted(market.scene_ad_cum[s], u[rows], side="right")
    ad = np.minimum(ad, market.n_ads - 1)
    interest = rng.random(n) < cfg.policy.interest_share
    rows = np.flatnonzero(interest)
    picked = sample_interest_ads(market, user[rows], rng)
    # keep an interest pick only if that ad may show in this scene
    ok = picked >= 0
    ok[ok] = market.scene_ad_cum[scene[rows[ok]], picked[ok]] > np.where(
        picked[ok] > 0, market.scene_ad_cum[scene[rows[ok]], picked[ok] - 1], 0.0)
    ad[rows[ok]] = picked[ok]
    return ad


def _chunk_requests(cfg: SimConfig, market: Marketplace, rng: np.random.Generator,
                    r0: int, r1: int) -> dict[str, np.ndarray]:
    lg = cfg.log
    n, total = r1 - r0, lg.n_requests
    span = lg.days * 86_400_000
    w0, w1 = (span * r0) // total, (span * r1) // total
    # distinct, increasing milliseconds: "strictly before" is then unambiguous
    ts = lg.start_ts + w0 + np.sort(rng.integers(0, w1 - w0 - n + 1, n)) + np.arange(n)
    user = np.searchsorted(market.user_activity_cum, rng.random(n), side="right")
    user = np.minimum(user, market.n_users - 1)
    shares = np.array([s.share for s in cfg.scenes.values()])
    scene = rng.choice(len(shares), n, p=shares / shares.sum()).astype(np.int8)
    device = np.where(rng.random(n) < 0.85, market.user_device[user],
                      rng.integers(0, len(DEVICES), n)).astype(np.int8)
    return {"request_id": np.arange(r0, r1, dtype=np.int64), "ts": ts.astype(np.int64),
            "user_id": user.astype(np.int64), "scene": scene,
            "hour": ((ts // MS_PER_HOUR) % 24).astype(np.int64), "device": device}


def simulate_chunk(cfg: SimConfig, market: Marketplace, state: np.ndarray, seed: int,
                   index: int, r0: int, r1: int) -> Chunk:
    """Requests r0..r1 of the log; updates `state` (per-user sequences) in place."""
    rng = np.random.default_rng([seed, 1, index])
    req = _chunk_requests(cfg, market, rng, r0, r1)
    n = r1 - r0
    slots = np.array([s.slots for s in cfg.scenes.values()])[req["scene"]]
    imp_req = np.repeat(np.arange(n), slots)
    starts = np.concatenate([[0], np.cumsum(slots)[:-1]])
    position = np.arange(imp_req.shape[0]) - starts[imp_req]
    user, scene = req["user_id"][imp_req], req["scene"][imp_req]
    ad = _pick_ads(market, cfg, rng, user, scene)
    u_click, u_conv = rng.random(imp_req.shape[0]), rng.random(imp_req.shape[0])
    act = np.zeros(imp_req.shape[0], dtype=np.float32)
    hist = np.full((n, state.shape[1]), PAD, dtype=np.int32)
    click = np.zeros(imp_req.shape[0], dtype=bool)
    # wave k = every user's k-th request in this chunk
    by_user = np.lexsort((np.arange(n), req["user_id"]))
    u_sorted = req["user_id"][by_user]
    first = np.concatenate([[True], u_sorted[1:] != u_sorted[:-1]])
    run_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    wave = np.empty(n, dtype=np.int64)
    wave[by_user] = np.arange(n) - run_start
    wave_order = np.argsort(wave, kind="stable")
    wave_bounds = np.searchsorted(wave[wave_order], np.arange(wave.max() + 2))
    imp_wave = wave[imp_req]
    imp_order = np.argsort(imp_wave, kind="stable")  # stable: request, position order kept
    imp_bounds = np.searchsorted(imp_wave[imp_order], np.arange(wave.max() + 2))
    for k in range(wave_bounds.shape[0] - 1):
        rows = wave_order[wave_bounds[k]:wave_bounds[k + 1]]
        hist[rows] = state[req["user_id"][rows]]
        imp = imp_order[imp_bounds[k]:imp_bounds[k + 1]]
        act[imp] = history_activation(cfg, market, hist[imp_req[imp]], ad[imp])
        ctr_logit, _ = true_logits(cfg, market, user[imp], ad[imp], scene[imp], position[imp],
                                   act[imp])
        click[imp] = u_click[imp] < _sigmoid(ctr_logit)
        _append_clicks(state, req["user_id"], imp_req[imp[click[imp]]], ad[imp[click[imp]]])
    ctr_logit, cvr_logit = true_logits(cfg, market, user, ad, scene, position, act)
    pctr = _sigmoid(ctr_logit).astype(np.float32)
    pcvr = _sigmoid(cvr_logit).astype(np.float32)
    pctr_learnable, pcvr_learnable = learnable_probabilities(cfg, market, ad, ctr_logit,
                                                             cvr_logit)
    conversion = click & (u_conv < pcvr)
    impressions = {
        "request_id": req["request_id"][imp_req], "ts": req["ts"][imp_req],
        "user_id": user, "scene": scene, "position": position.astype(np.int64),
        "hour": req["hour"][imp_req], "device": req["device"][imp_req], "ad_id": ad,
        "click": click.astype(np.int8), "conversion": conversion.astype(np.int8),
        "true_pctr": pctr, "true_pcvr": pcvr,
        "true_pctr_learnable": pctr_learnable, "true_pcvr_learnable": pcvr_learnable,
    }
    return Chunk(requests=req, hist=hist, impressions=impressions)


def _append_clicks(state: np.ndarray, user_of_req: np.ndarray, clicked_req: np.ndarray,
                   clicked_ad: np.ndarray) -> None:
    """Prepend each request's clicked ads to its user's sequence (newest first, capped).

    Within one request the lower slot is taken as clicked first, so it ends up older.
    `clicked_req` is sorted (impressions are in request, position order) and every request
    here belongs to a different user (one wave).
    """
    if clicked_req.shape[0] == 0:
        return
    reqs, first, counts = np.unique(clicked_req, return_index=True, return_counts=True)
    users = user_of_req[reqs]
    seq_len = state.shape[1]
    grown = np.full((reqs.shape[0], seq_len + counts.max()), PAD, dtype=state.dtype)
    row = np.arange(reqs.shape[0])
    grown[row[:, None], counts[:, None] + np.arange(seq_len)] = state[users]
    which = np.repeat(row, counts)
    j = np.arange(clicked_req.shape[0]) - first[which]
    grown[which, counts[which] - 1 - j] = clicked_ad
    state[users] = grown[:, :seq_len]


def _strings(names: tuple[str, ...], idx: np.ndarray) -> pa.Array:
    return pa.array(names).take(pa.array(idx.astype(np.int32)))


def _sequence_column(values: np.ndarray) -> pa.Array:
    """[rows, L] padded matrix (pads at the end) -> list<int64> without the pads."""
    valid = values >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[valid].astype(np.int64)))


def _write_chunk(chunk: Chunk, market: Marketplace, out: Path, index: int) -> None:
    req, imp = chunk.requests, chunk.impressions
    hist_cat = np.where(chunk.hist >= 0, market.ads["category_id"][np.maximum(chunk.hist, 0)], PAD)
    requests = pa.table({
        "request_id": req["request_id"], "ts": req["ts"], "user_id": req["user_id"],
        "scene": _strings(market.scenes, req["scene"]), "hour": req["hour"],
        "device": _strings(DEVICES, req["device"]),
        "hist_ad_id": _sequence_column(chunk.hist), "hist_category_id": _sequence_column(hist_cat),
    })
    columns = dict(imp)
    columns["scene"] = _strings(market.scenes, imp["scene"])
    columns["device"] = _strings(DEVICES, imp["device"])
    name = f"part-{index:05d}.parquet"
    pq.write_table(requests, out / layout.REQUESTS_DIR / name)
    pq.write_table(pa.table(columns), out / layout.IMPRESSIONS_DIR / name)


def _write_catalog(market: Marketplace, out: Path) -> None:
    ads = dict(market.ads)
    ads["scenes"] = market.ad_scenes
    ads["creative_id"] = market.ad_creative
    pq.write_table(pa.table({c: ads[c] for c in layout.AD_COLUMNS}), out / layout.ADS_FILE)
    pq.write_table(pa.table(market.campaigns), out / layout.CAMPAIGNS_FILE)
    pq.write_table(pa.table(market.users), out / layout.USERS_FILE)


class _Tally:
    """Counts by scene and position, and the rows the oracle's metrics are computed on."""

    def __init__(self, market: Marketplace, cfg: SimConfig) -> None:
        self.scenes = market.scenes
        self.n_pos = max(s.slots for s in cfg.scenes.values())
        self.counts = np.zeros((3, len(self.scenes), self.n_pos), dtype=np.int64)
        mean_slots = sum(s.slots * s.share for s in cfg.scenes.values()) / sum(
            s.share for s in cfg.scenes.values())
        expected = cfg.log.n_requests * mean_slots
        # a user sample (not a row sample) so per-user GAUC stays meaningful
        self.user_stride = max(1, int(np.ceil(expected / cfg.log.oracle_max_rows)))
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, imp: dict[str, np.ndarray]) -> None:
        flat = imp["scene"].astype(np.int64) * self.n_pos + imp["position"]
        size = len(self.scenes) * self.n_pos
        for i, w in enumerate((None, imp["click"], imp["conversion"])):
            self.counts[i] += np.bincount(flat, weights=w, minlength=size).astype(
                np.int64).reshape(len(self.scenes), self.n_pos)
        keep = imp["user_id"] % self.user_stride == 0
        self.parts.append({k: imp[k][keep] for k in
                           ("user_id", "click", "conversion", "true_pctr", "true_pcvr",
                            "true_pctr_learnable", "true_pcvr_learnable")})

    @staticmethod
    def _rates(n: int, clicks: int, conversions: int) -> dict[str, float | int]:
        return {"impressions": n, "clicks": clicks, "conversions": conversions,
                "ctr": clicks / n if n else 0.0, "cvr": conversions / clicks if clicks else 0.0}

    def summary(self) -> dict:
        n, clicks, conv = (int(x) for x in self.counts.sum(axis=(1, 2)))
        by_scene = {name: self._rates(*(int(x) for x in self.counts[:, i].sum(axis=1)))
                    for i, name in enumerate(self.scenes)}
        by_position = {str(p): self._rates(*(int(x) for x in self.counts[:, :, p].sum(axis=1)))
                       for p in range(self.n_pos)}
        o = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        clicked = o["click"] == 1

        def scored(pctr: np.ndarray, pcvr: np.ndarray) -> dict[str, float]:
            return {
                "ctr_auc": metrics.auc(o["click"], pctr),
                "ctr_gauc": metrics.gauc(o["click"], pctr, o["user_id"]),
                "cvr_auc": metrics.auc(o["conversion"][clicked], pcvr[clicked]),
                "ctcvr_auc": metrics.auc(o["conversion"], pctr * pcvr),
                "calibration": metrics.calibration(o["click"], pctr),
            }

        sample = {"rows": int(o["click"].shape[0]), "user_sample_stride": self.user_stride}
        oracle = scored(o["true_pctr"], o["true_pcvr"]) | sample
        learnable = scored(o["true_pctr_learnable"], o["true_pcvr_learnable"]) | sample
        return {"impressions": n, "clicks": clicks, "conversions": conv,
                "ctr": clicks / n if n else 0.0, "cvr": conv / clicks if clicks else 0.0,
                "by_scene": by_scene, "by_position": by_position, "oracle": oracle,
                "oracle_learnable": learnable}


def check_out_dir(out: str | Path) -> Path:
    """Refuse a non-empty directory unless it is a previous dataset (which gets replaced):
    a typo in --out must never wipe someone's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / layout.SUMMARY_FILE).is_file():
        raise ValueError(f"--out {out} is not empty and holds no previous dataset "
                         "(refusing to write into it)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: parent directory {out.parent} does not exist")
    return out


def _prepare_out(out: Path) -> Path:
    """Return a staging directory beside `out`: the dataset is moved into place at the end,
    so an interrupted run never leaves a half-written dataset readers would take for whole."""
    check_out_dir(out)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / layout.REQUESTS_DIR).mkdir(parents=True)
    (staging / layout.IMPRESSIONS_DIR).mkdir()
    return staging


def simulate(cfg: SimConfig, seed: int, out: str | Path, schema_path: str | Path | None = None,
             progress: ProgressFn | None = None) -> dict:
    """Generate a marketplace and its logs into `out`; return the summary (also written)."""
    started = time.perf_counter()
    schema: FeatureSchema = load_schema(schema_path)
    cfg.validate(schema)
    out = Path(out)
    staging = _prepare_out(out)
    try:
        market = build_marketplace(cfg, seed, schema.sequence_len)
        _write_catalog(market, staging)
        state = market.initial_history.copy()
        tally = _Tally(market, cfg)
        step = cfg.log.chunk_requests
        bounds = list(range(0, cfg.log.n_requests, step)) + [cfg.log.n_requests]
        total = len(bounds) - 1
        if progress:
            progress(0, total)
        for i in range(total):
            chunk = simulate_chunk(cfg, market, state, seed, i, bounds[i], bounds[i + 1])
            _write_chunk(chunk, market, staging, i)
            tally.add(chunk.impressions)
            del chunk
            if progress:
                progress(i + 1, total)
        summary = {"scale": cfg.scale, "seed": seed, "ads": market.n_ads,
                   "active_ads": int((market.ads["status"] == "active").sum()),
                   "campaigns": int(market.campaigns["campaign_id"].shape[0]),
                   "users": market.n_users, "requests": cfg.log.n_requests,
                   **tally.summary(), "schema_sha256": schema.sha256,
                   "seconds": round(time.perf_counter() - started, 2)}
        shutil.copyfile(Path(schema_path) if schema_path else DEFAULT_SCHEMA_PATH,
                        staging / layout.SCHEMA_FILE)
        (staging / "sim_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (staging / layout.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
