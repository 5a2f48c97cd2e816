"""Qscore screening: drop ineligible candidates, keep the top K2 by a Qscore-based eCPM estimate.

Eligibility (any failure drops the ad): the ad is in the catalog snapshot and active; its
campaign exists and is active; pacing lets the campaign serve now (`Pacer.eligible`: budget
left and on schedule); the user has seen the campaign fewer than `freq_cap` times today (caps
come with the user context, read in the same round trip as the profile); the ad targets the
request's scene.

Ordering, never by raw bid: `estimate = 1000 * qctr * click_value`, where `qctr` is the ad's
Qscore posterior CTR and click_value is the CPC bid, or target CPA x prior CVR for oCPA. A
high bid with a poor CTR therefore does not crowd out a good ad, and a new ad competes at the
catalog's prior CTR.

Qscore counters (decided here): a LOCAL snapshot, not a per-request read. The posterior is
`(clicks + a) / (impressions + a + b)` over the bundle's training counts plus the online `qs:{ad}`
counters, re-read in one batched call every `refresh_s` (5 s). A request then pays one
vectorised lookup; the price is that a click takes up to `refresh_s` to move an ad's Qscore,
which for a smoothed CTR is immaterial.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from models.nn.qscore import Qscore
from services.common.store import OnlineStore
from services.gateway.catalog import Catalog
from services.gateway.pacing import CHANGE_SKEW_S

log = logging.getLogger(__name__)

DEFAULT_PRIOR = Qscore(1.0, 99.0)


class QscoreTable:
    """Per-ad posterior CTR: bundle counts + online counters, smoothed by the fitted prior.

    Sized for a million-ad catalog: the bundle's counts live in sorted numpy arrays, and a
    refresh re-reads only the online counters that moved since the last one
    (`store.changed_since('qs')`, marked by whichever replica's worker applied the events).
    """

    def __init__(self, prior: Qscore = DEFAULT_PRIOR,
                 base: Mapping[int, tuple[int, int]] | None = None) -> None:
        self.prior = prior
        base = base or {}
        self._ids = np.fromiter(base.keys(), np.int64, len(base))
        counts = np.asarray(list(base.values()), np.float64).reshape(-1, 2)
        order = np.argsort(self._ids)
        self._ids = self._ids[order]
        self._base_imps, self._base_clicks = counts[order, 0], counts[order, 1]
        self._ctr = prior.score(self._base_imps, self._base_clicks)
        self._online_ids = np.empty(0, np.int64)  # sorted ids with online counters
        self._online_ctr = np.empty(0, np.float64)
        self._changes_read_at = 0.0

    def _base_counts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        imps, clicks = np.zeros(ids.size), np.zeros(ids.size)
        if self._ids.size and ids.size:
            pos = np.clip(np.searchsorted(self._ids, ids), 0, self._ids.size - 1)
            hit = self._ids[pos] == ids
            imps[hit], clicks[hit] = self._base_imps[pos[hit]], self._base_clicks[pos[hit]]
        return imps, clicks

    def set_online(self, counts: Mapping[int, tuple[int, int]]) -> None:
        """Online counters (absolute, per ad) on top of the bundle's counts."""
        merged = dict(zip(self._online_ids.tolist(), self._online_ctr.tolist(), strict=True))
        if counts:
            ids = np.fromiter(counts.keys(), np.int64, len(counts))
            online = np.asarray(list(counts.values()), np.float64).reshape(-1, 2)
            base_imps, base_clicks = self._base_counts(ids)
            imps = base_imps + online[:, 0]
            clicks = np.minimum(base_clicks + online[:, 1], imps)
            merged.update(zip(ids.tolist(), self.prior.score(imps, clicks).tolist(),
                              strict=True))
        ids = np.fromiter(merged.keys(), np.int64, len(merged))
        order = np.argsort(ids)
        self._online_ids = ids[order]
        self._online_ctr = np.fromiter(merged.values(), np.float64, len(merged))[order]

    def ctr(self, ad_ids: np.ndarray) -> np.ndarray:
        """Posterior CTR per ad; the prior mean for ads with no counts."""
        ids = np.asarray(ad_ids, dtype=np.int64)
        out = np.full(ids.shape, self.prior.prior_mean, np.float64)
        for table_ids, table_ctr in ((self._ids, self._ctr),
                                     (self._online_ids, self._online_ctr)):
            if table_ids.size and ids.size:
                pos = np.clip(np.searchsorted(table_ids, ids), 0, table_ids.size - 1)
                hit = table_ids[pos] == ids
                out[hit] = table_ctr[pos[hit]]
        return out

    async def refresh(self, store: OnlineStore, ad_ids: Iterable[int] | None = None) -> None:
        """Re-read the counters of `ad_ids`, or of every ad whose counters moved since the
        last refresh; the rebuild runs off the event loop."""
        read_at = time.time()
        if ad_ids is None:
            ids = await store.changed_since("qs", self._changes_read_at - CHANGE_SKEW_S)
        else:
            ids = list(ad_ids)
        if ids:
            counts = await store.get_qscores(ids)
            nonzero = {k: (int(v[0]), int(v[1])) for k, v in counts.items() if v[0] or v[1]}
            await asyncio.to_thread(self.set_online, nonzero)
        self._changes_read_at = read_at

    async def run(self, store: OnlineStore, catalog: Catalog, stop: asyncio.Event,
                  refresh_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                await self.refresh(store)
            except Exception:  # noqa: BLE001 - keep the last snapshot
                log.exception("qscore refresh failed; keeping the previous counters")
            try:
                await asyncio.wait_for(stop.wait(), refresh_s)
            except TimeoutError:
                pass


@dataclass(frozen=True)
class ScreenPolicy:
    """The knobs of screening (from `GatewayConfig`)."""

    k: int = 2000
    freq_cap: int = 5  # impressions per campaign per user per UTC day; 0 = no cap
    prior_cvr: float = 0.05


@dataclass(frozen=True)
class Screened:
    """Survivors in Qscore-eCPM order, with the estimate and the Qscore CTR of each."""

    ad_ids: np.ndarray
    rows: np.ndarray
    estimate: np.ndarray
    qctr: np.ndarray
    dropped: dict[str, int]


def click_value(catalog: Catalog, rows: np.ndarray, prior_cvr: float) -> np.ndarray:
    """What a click is worth to the auction before ranking: the CPC bid, or for oCPA the
    target CPA x a prior CVR (micros)."""
    c = catalog.cols
    return np.where(c.ocpa[rows], c.target_cpa_micros[rows] * prior_cvr,
                    c.bid_micros[rows].astype(np.float64))


def qscore_estimate(catalog: Catalog, rows: np.ndarray, qctr: np.ndarray,
                    prior_cvr: float) -> np.ndarray:
    """1000 x qCTR x click value, in micros per mille."""
    return 1000.0 * qctr * click_value(catalog, rows, prior_cvr)


def screen(candidates: np.ndarray, *, scene: str, caps: Mapping[int, int], catalog: Catalog,
           qscores: QscoreTable, pacing: Callable[[set[int]], set[int]],
           policy: ScreenPolicy) -> Screened:
    """Apply the eligibility rules, then keep the top `policy.k` by the Qscore estimate."""
    ids = np.unique(np.asarray(candidates, dtype=np.int64))  # also drops duplicates
    dropped: dict[str, int] = {}

    def keep(mask: np.ndarray, reason: str) -> None:
        nonlocal ids, rows
        dropped[reason] = dropped.get(reason, 0) + int((~mask).sum())
        ids, rows = ids[mask], rows[mask]

    rows = catalog.rows_of(ids)
    keep(rows >= 0, "unknown")
    keep(catalog.cols.active[rows], "ad_paused")
    keep((catalog.cols.scene_bits[rows] & catalog.scene_bit(scene)) != 0, "scene")
    campaigns = catalog.cols.campaign_id[rows]
    unique = np.unique(campaigns)
    live = unique[catalog.campaign_active(unique)]
    keep(np.isin(campaigns, live), "campaign_paused")
    campaigns = catalog.cols.campaign_id[rows]
    paced = pacing({int(c) for c in np.unique(campaigns).tolist()})
    keep(np.isin(campaigns, np.fromiter(paced, np.int64, len(paced))), "paced")
    if policy.freq_cap > 0 and caps:
        capped = [cid for cid, n in caps.items() if n >= policy.freq_cap]
        campaigns = catalog.cols.campaign_id[rows]
        keep(~np.isin(campaigns, np.asarray(capped, np.int64)), "freq_cap")
    qctr = qscores.ctr(ids)
    estimate = qscore_estimate(catalog, rows, qctr, policy.prior_cvr)
    if ids.size > policy.k:
        top = np.argpartition(-estimate, policy.k - 1)[:policy.k]
    else:
        top = np.arange(ids.size)
    order = top[np.lexsort((ids[top], -estimate[top]))]  # ties: lower ad id first
    return Screened(ids[order], rows[order], estimate[order], qctr[order], dropped)


def pacing_filter(pacer: object, rng: random.Random | None = None
                  ) -> Callable[[set[int]], set[int]]:
    """Adapt `Pacer.eligible` (one draw per campaign per request) to `screen`'s callable."""
    return lambda campaigns: pacer.eligible(campaigns, rng=rng)  # type: ignore[attr-defined]
