"""`cascade funnel`: what each stage keeps of the best ads the full ranker would pick.

For each sampled request (from the bundle's test split) the full ranker (DIN+ESMM) scores the
WHOLE eligible corpus; its top N by eCPM (one ad per campaign, as the auction allows) is the
ideal. The cascade then runs with the serving stages and the gateway's own screening code:
recall (K1) -> screen (K2 by Qscore eCPM) -> pre-rank (K3 by DQM). The report gives the share
of the ideal top N that is still present after each stage, and the eCPM the cascade's final top
N loses against the ideal (both priced by the same ranker, so only the funnel differs).

On a simulated dataset the same is reported against the oracle: the top N by TRUE eCPM (the
simulator's pCTR and pCVR, rebuilt by models.data.truth) over the same corpus, and the true
eCPM the cascade's final top N loses against it (which counts the ranker's errors too).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.bundle import read_bundle
from models.data import layout
from models.data.truth import Truth, TruthUnavailable
from models.pricing import click_value, ecpm
from models.train.split import ColumnSplit, Split, split_from_dict
from services.common import wire
from services.common.config import Settings
from services.common.store_load import load_marketplace
from services.common.store_memory import MemoryStore
from services.gateway.cascade import GatewayConfig
from services.gateway.catalog import Catalog
from services.gateway.screening import QscoreTable, ScreenPolicy, catalog_click_value, screen
from services.gateway.stage_loaders import bundle_priors, load_stage

RANK_CHUNK = 4096
STAGES = ("retrieval", "screen", "prerank")


@dataclass
class FunnelRequest:
    """One logged request in wire terms."""

    request_id: int
    user_id: int
    scene: str
    user: dict[str, Any]
    hist: dict[str, wire.Column]
    context: dict[str, Any]


def sample_requests(data_dir: Path, split: Split, n: int, seed: int) -> list[FunnelRequest]:
    """N requests from the bundle's test rows (its test period, or the requests of the
    impressions a dataset's own `split` column puts in test), with profile and sequence."""
    requests = pq.read_table(data_dir / layout.REQUESTS_DIR).to_pydict()
    if isinstance(split, ColumnSplit):
        imps = pq.read_table(data_dir / layout.IMPRESSIONS_DIR,
                             columns=["request_id", "split"]).to_pydict()
        test_ids = {r for r, part in zip(imps["request_id"], imps["split"], strict=True)
                    if part == "test"}
        test = np.flatnonzero([r in test_ids for r in requests["request_id"]])
    else:
        test = np.flatnonzero(np.asarray(requests["ts"]) >= split.valid_end_ts)
    if test.size == 0:
        raise ValueError(f"{data_dir}: no requests in the bundle's test split")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(test, size=min(n, test.size), replace=False))
    users = pq.read_table(data_dir / layout.USERS_FILE).to_pydict()
    row_of = {int(u): i for i, u in enumerate(users["user_id"])}
    profile_cols = [c for c in users if c != "user_id"]
    out = []
    for i in pick.tolist():
        row = row_of.get(int(requests["user_id"][i]))
        user = {c: users[c][row] for c in profile_cols} if row is not None else {}
        hist = {name: wire.Column(ints=np.asarray(requests[name][i] or [], dtype=np.int64))
                for name in ("hist_ad_id", "hist_category_id") if name in requests}
        context = {"hour": int(requests["hour"][i]), "device": str(requests["device"][i]),
                   "position": 0}
        out.append(FunnelRequest(int(requests["request_id"][i]), int(requests["user_id"][i]),
                                 str(requests["scene"][i]), user, hist, context))
    return out


def _ecpm(catalog: Catalog, ad_ids: np.ndarray, pctr: np.ndarray, pcvr: np.ndarray) -> np.ndarray:
    """The auction's eCPM (micros per mille): CPC bid x pCTR, oCPA target CPA x pCTR x pCVR."""
    return ecpm(pctr, catalog_click_value(catalog.view, catalog.rows_of(ad_ids), pcvr))


def top_per_campaign(catalog: Catalog, ad_ids: np.ndarray, ecpm: np.ndarray, n: int) -> np.ndarray:
    """Indices of the best `n` ads by eCPM, at most one per campaign (the auction's rule;
    ties: lower ad id first).

    Only the head of the order matters, so it sorts every ad scoring at least the k-th best
    (a prefix of the full order, ties included) and widens k only when that head holds fewer
    than `n` campaigns: a whole-corpus call costs a partition, not a sort of 100k ads."""
    ecpm = np.asarray(ecpm, np.float64)
    size = ad_ids.size
    k = min(size, max(64, 8 * n))
    while True:
        if k < size:
            threshold = np.partition(ecpm, size - k)[size - k]
            head = np.flatnonzero(ecpm >= threshold)
        else:
            head = np.arange(size)
        order = head[np.lexsort((ad_ids[head], -ecpm[head]))]
        campaigns = catalog.view.ads.campaign_id[catalog.rows_of(ad_ids[order])]
        _, first = np.unique(campaigns, return_index=True)
        if first.size >= n or k >= size:
            return order[np.sort(first)][:n]
        k = min(size, 4 * k)


class Funnel:
    """The serving stages and the gateway's screening, driven offline."""

    def __init__(self, bundle_path: str, data_dir: Path, config: GatewayConfig | None = None):
        settings = Settings()
        self.bundle = read_bundle(bundle_path)
        # the K's `cascade serve` would run: the bundle's recommendation unless set explicitly
        self.config = (config or GatewayConfig()).for_bundle(self.bundle.manifest)
        self.retrieval = load_stage("retrieval", bundle_path, settings)
        self.prerank = load_stage("prerank", bundle_path, settings)
        self.rank = load_stage("rank", bundle_path, settings)
        prior, counts, self.prior_cvr = bundle_priors(self.bundle)
        self.qscores = QscoreTable(prior, counts)
        try:
            self.truth: Truth | None = Truth.from_dataset(data_dir)
        except TruthUnavailable:  # an imported dataset: no oracle to compare with
            self.truth = None
        self.catalog = Catalog(scenes=tuple(self.config.scenes), qscore=self.qscores.ctr)
        store = MemoryStore()
        asyncio.run(self._load(store, data_dir))

    async def _load(self, store: MemoryStore, data_dir: Path) -> None:
        await load_marketplace(store, data_dir)
        await self.catalog.load(store)

    def eligible(self, scene: str) -> np.ndarray:
        """Every ad that may serve in `scene`: active, targeted, campaign active."""
        return self.catalog.view.ads.ad_id[self.catalog.servable(scene)]

    def rank_all(self, req: FunnelRequest, ad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ad ids, eCPM) by the full ranker, in chunks to bound memory."""
        ids, ecpm = [], []
        for start in range(0, ad_ids.size, RANK_CHUNK):
            out = self.rank.handle(wire.RankRequest(
                scene=req.scene, user=req.user, hist=req.hist, context=req.context,
                ad_ids=ad_ids[start:start + RANK_CHUNK]))
            ids.append(out.ad_ids)
            ecpm.append(_ecpm(self.catalog, out.ad_ids, out.pctr, out.pcvr))
        return np.concatenate(ids), np.concatenate(ecpm)

    def cascade(self, req: FunnelRequest) -> dict[str, np.ndarray]:
        """The candidate set after each stage, as the gateway would run it."""
        cfg = self.config
        part = dict(scene=req.scene, user=req.user, hist=req.hist, context=req.context)
        recalled = self.retrieval.handle(wire.RecallRequest(**part, k=cfg.k1)).ad_ids
        screened = screen(recalled, scene=req.scene, caps={}, catalog=self.catalog, pacer=None,
                          policy=ScreenPolicy(k=cfg.k2, freq_cap=0, prior_cvr=self.prior_cvr))
        preranked = self.prerank.handle(wire.PrerankRequest(
            **part, ad_ids=screened.ad_ids, k=cfg.k3, values=screened.click_value)).ad_ids
        return {"retrieval": recalled, "screen": screened.ad_ids, "prerank": preranked}

    def measure(self, req: FunnelRequest, top_n: int) -> dict[str, float]:
        corpus = self.eligible(req.scene)
        all_ids, all_ecpm = self.rank_all(req, corpus)
        ideal = all_ids[top_per_campaign(self.catalog, all_ids, all_ecpm, top_n)]
        stages = self.cascade(req)
        out = {stage: float(np.isin(ideal, stages[stage]).mean()) for stage in STAGES}
        final = stages["prerank"]
        ecpm_of = dict(zip(all_ids.tolist(), all_ecpm.tolist(), strict=True))
        final_ecpm = np.asarray([ecpm_of.get(int(a), 0.0) for a in final])
        chosen = top_per_campaign(self.catalog, final, final_ecpm, top_n)
        ideal_sum = float(sum(ecpm_of[int(a)] for a in ideal))
        out["ecpm_lost"] = 1.0 - float(final_ecpm[chosen].sum()) / max(ideal_sum, 1e-12)
        out["corpus"] = float(corpus.size)
        if self.truth is not None:
            out.update(self.against_oracle(req, corpus, stages, final[chosen], top_n))
        return out

    def true_ecpm(self, req: FunnelRequest, ad_ids: np.ndarray) -> np.ndarray:
        """eCPM under the simulator's true pCTR and pCVR (first slot, as the ranker scores)."""
        assert self.truth is not None
        hist = req.hist.get("hist_ad_id")
        seq = hist.ints if hist is not None and hist.ints is not None else np.empty(0, np.int64)
        pctr, pcvr = self.truth.request(req.user_id, seq, req.scene, 0, ad_ids)
        ocpa, bid, tcpa = self.truth.bid_terms(ad_ids)
        return ecpm(pctr, click_value(ocpa, bid, tcpa, pcvr))

    def against_oracle(self, req: FunnelRequest, corpus: np.ndarray,
                       stages: dict[str, np.ndarray], final: np.ndarray,
                       top_n: int) -> dict[str, float]:
        """Survival of the oracle's top N, and the true eCPM the cascade's pick loses."""
        true = self.true_ecpm(req, corpus)
        ideal = top_per_campaign(self.catalog, corpus, true, top_n)
        ideal_ids = corpus[ideal]
        out = {f"oracle_{stage}": float(np.isin(ideal_ids, stages[stage]).mean())
               for stage in STAGES}
        picked = self.true_ecpm(req, final).sum() if final.size else 0.0
        out["oracle_ecpm_lost"] = 1.0 - float(picked) / max(float(true[ideal].sum()), 1e-12)
        return out


def run_funnel(data_dir: str | Path, bundle_path: str | Path, requests: int, top_n: int = 10,
               seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """The funnel JSON: per-stage survival of the full-corpus top N, and the eCPM lost."""
    data_dir = layout.require_dataset(data_dir)
    if requests < 1:
        raise ValueError("--requests must be at least 1")
    funnel = Funnel(str(bundle_path), data_dir)
    split = split_from_dict(funnel.bundle.manifest["split"])
    sampled = sample_requests(data_dir, split, requests, seed)
    rows = []
    for req in sampled:
        rows.append(funnel.measure(req, top_n))
        if progress:
            progress()
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    cfg = funnel.config
    oracle = None
    if funnel.truth is not None:
        oracle = {"survival": {stage: round(mean[f"oracle_{stage}"], 4) for stage in STAGES},
                  "reach_ranker": round(mean["oracle_prerank"], 4),
                  "ecpm_lost": round(mean["oracle_ecpm_lost"], 4)}
    return {
        "requests": len(rows),
        "top_n": top_n,
        "bundle": funnel.bundle.version,
        "k": {"retrieval": cfg.k1, "screen": cfg.k2, "prerank": cfg.k3},
        "mean_corpus": round(mean.pop("corpus"), 1),
        "survival": {stage: round(mean[stage], 4) for stage in STAGES},
        "reach_ranker": round(mean["prerank"], 4),
        "ecpm_lost": round(mean["ecpm_lost"], 4),
        "goal": {"reach_ranker_at_least": 0.9, "met": bool(mean["prerank"] >= 0.9)},
        "vs_oracle": oracle,
    }
