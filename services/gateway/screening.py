"""Qscore screening: drop ineligible candidates, keep the top K2 by a Qscore-based eCPM estimate.

Eligibility (any failure drops the ad): the ad is in the catalog snapshot and active; its
campaign exists and is active; pacing lets the campaign serve now (`Pacer.eligible`: budget
left and on schedule); the user has seen the campaign fewer than `freq_cap` times today (caps
come with the user context, read in the same round trip as the profile); the ad targets the
request's scene.

Ordering, never by raw bid: `estimate = models.pricing.qscore_ecpm` (1000 x qCTR x click value,
click value the CPC bid, or target CPA x prior CVR for oCPA), with the Qscore posterior CTR. A
high bid with a poor CTR therefore does not crowd out a good ad, and a new ad competes at the
catalog's prior CTR.

Qscore counters (decided here): a LOCAL snapshot, not a per-request read. The posterior is
`(clicks + a) / (impressions + a + b)` over the bundle's training counts plus the online `qs:{ad}`
counters, re-read in one batched call every `refresh_s` (5 s) into the catalog's `qctr` column.
A request then pays one gather; the price is that a click takes up to `refresh_s` to move an
ad's Qscore, which for a smoothed CTR is immaterial.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from models.nn.qscore import Qscore
from models.pricing import PRIOR_CVR, click_value, ecpm
from services.common.id_index import IdIndex, unique_values
from services.common.store import OnlineStore
from services.gateway.catalog import Catalog, CatalogView, take_records
from services.gateway.pacing import CHANGE_SKEW_S, Pacer

log = logging.getLogger(__name__)

DEFAULT_PRIOR = Qscore(1.0, 99.0)


class QscoreTable:
    """Per-ad posterior CTR: bundle counts + online counters, smoothed by the fitted prior.

    The CTR the request path reads is the catalog's `qctr` column (one gather); this table
    computes it: for new ads (the catalog's `qscore` hook) and for ads whose online counters
    moved (`refresh` -> `Catalog.set_qctr`, re-reading only what changed since the last refresh:
    `store.changed_since('qs')`, marked by whichever replica's worker applied the events).
    """

    def __init__(self, prior: Qscore = DEFAULT_PRIOR,
                 base: Mapping[int, tuple[int, int]] | None = None) -> None:
        self.prior = prior
        base = base or {}
        counts = np.asarray(list(base.values()), np.float64).reshape(-1, 2)
        self._base = IdIndex(np.fromiter(base.keys(), np.int64, len(base)))
        self._base_imps, self._base_clicks = counts[:, 0], counts[:, 1]
        self._online: dict[int, float] = {}  # ads with online counters: their posterior CTR
        self._changes_read_at = 0.0

    def _base_counts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self._base.rows(ids)
        hit = rows >= 0
        imps, clicks = np.zeros(ids.size), np.zeros(ids.size)
        imps[hit], clicks[hit] = self._base_imps[rows[hit]], self._base_clicks[rows[hit]]
        return imps, clicks

    def online_ctr(self, counts: Mapping[int, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, posterior CTR) of online counters (absolute, per ad) on top of the bundle's."""
        ids = np.fromiter(counts.keys(), np.int64, len(counts))
        online = np.asarray(list(counts.values()), np.float64).reshape(-1, 2)
        base_imps, base_clicks = self._base_counts(ids)
        imps = base_imps + online[:, 0]
        clicks = np.minimum(base_clicks + online[:, 1], imps)
        ctr = self.prior.score(imps, clicks)
        self._online.update(zip(ids.tolist(), ctr.tolist(), strict=True))
        return ids, ctr

    def ctr(self, ad_ids: np.ndarray) -> np.ndarray:
        """Posterior CTR per ad; the prior mean for ads with no counts."""
        ids = np.asarray(ad_ids, dtype=np.int64)
        imps, clicks = self._base_counts(ids)
        out = np.where(imps > 0, self.prior.score(imps, clicks), self.prior.prior_mean)
        if self._online:
            online = self._online
            for i in np.flatnonzero(np.isin(ids, np.fromiter(online, np.int64))).tolist():
                out[i] = online[int(ids[i])]
        return out

    async def refresh(self, store: OnlineStore, catalog: Catalog,
                      ad_ids: Iterable[int] | None = None) -> None:
        """Re-read the counters of `ad_ids`, or of every ad whose counters moved since the
        last refresh, and write their CTR into the catalog (off the event loop)."""
        read_at = time.time()
        if ad_ids is None:
            ids = await store.changed_since("qs", self._changes_read_at - CHANGE_SKEW_S)
        else:
            ids = list(ad_ids)
        if ids:
            counts = await store.get_qscores(ids)
            nonzero = {k: (int(v[0]), int(v[1])) for k, v in counts.items() if v[0] or v[1]}
            if nonzero:
                def apply() -> None:
                    catalog.set_qctr(*self.online_ctr(nonzero))

                await asyncio.to_thread(apply)
        self._changes_read_at = read_at

    async def run(self, store: OnlineStore, catalog: Catalog, stop: asyncio.Event,
                  refresh_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                await self.refresh(store, catalog)
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
    prior_cvr: float = PRIOR_CVR


DROP_REASONS = ("unknown", "ad_paused", "scene", "campaign_paused", "paced", "freq_cap")


@dataclass(frozen=True)
class Screened:
    """Survivors in Qscore-eCPM order: ids, catalog rows, the estimate, the Qscore CTR and
    each survivor's click value; `dropped` counts the candidates each rule removed."""

    ad_ids: np.ndarray
    rows: np.ndarray
    estimate: np.ndarray
    qctr: np.ndarray
    click_value: np.ndarray
    dropped: dict[str, int]

    @classmethod
    def empty(cls) -> Screened:
        none = np.empty(0, np.int64)
        return cls(none, none, np.empty(0), np.empty(0), np.empty(0), {})


def catalog_click_value(view: CatalogView, rows: np.ndarray, pcvr: np.ndarray | float
                        ) -> np.ndarray:
    """`models.pricing.click_value` for catalog rows."""
    a = view.ads  # three column gathers: cheaper than whole records for large row sets
    return click_value(a.ocpa[rows], a.bid_micros[rows], a.target_cpa_micros[rows], pcvr)


def record_click_value(rec: np.ndarray, pcvr: np.ndarray | float) -> np.ndarray:
    """`models.pricing.click_value` for gathered catalog records (AD_RECORD)."""
    return click_value(rec["ocpa"], rec["bid_micros"], rec["target_cpa_micros"], pcvr)


def screen(candidates: np.ndarray, *, scene: str, caps: Mapping[int, int], catalog: Catalog,
           pacer: Pacer | None, policy: ScreenPolicy, seed: int = 0) -> Screened:
    """Apply the eligibility rules, then keep the top `policy.k` by the Qscore estimate.

    Columns only: every rule is a gather over the candidates' catalog rows (each ad row knows
    its campaign row), and the campaign-level rules (status, pacing, caps) read campaign
    columns through those rows. `pacer=None` lets every campaign pace in (offline tools).
    """
    view = catalog.view
    candidates = np.asarray(candidates, np.int64)
    found = view.ad_index.rows(candidates)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    if (found < 0).any():
        dropped["unknown"] = int(unique_values(candidates[found < 0]).size)
        found = found[found >= 0]
    rows = unique_values(found)  # also drops duplicates
    rec = view.ads.take(rows)  # one gather of packed records (one cache miss per ad)
    campaign_rows = rec["campaign_row"]
    checks = [("ad_paused", rec["active"]),
              ("scene", (rec["scene_bits"] & catalog.scene_bit(scene)) != 0),
              ("campaign_paused", (campaign_rows >= 0)
               & view.campaigns.active[np.maximum(campaign_rows, 0)])]
    keep = np.ones(rows.size, bool)
    for reason, ok in checks:
        dropped[reason] = int(np.count_nonzero(keep & ~ok))
        keep &= ok
    if pacer is not None:
        ok = pacer.serve_mask(campaign_rows, seed)
        dropped["paced"] = int(np.count_nonzero(keep & ~ok))
        keep &= ok
    if policy.freq_cap > 0 and caps:
        capped = [cid for cid, n in caps.items() if n >= policy.freq_cap]
        if capped:
            ok = ~np.isin(rec["campaign_id"], np.asarray(capped, np.int64))
            dropped["freq_cap"] = int(np.count_nonzero(keep & ~ok))
            keep &= ok
    rows, rec = rows[keep], take_records(rec, keep)
    qctr = rec["qctr"]
    value = record_click_value(rec, policy.prior_cvr)
    estimate = ecpm(qctr, value)
    if rows.size > policy.k:
        top = np.argpartition(-estimate, policy.k - 1)[:policy.k]
    else:
        top = np.arange(rows.size)
    ids = rec["ad_id"]
    order = top[np.lexsort((ids[top], -estimate[top]))]  # ties: lower ad id first
    return Screened(ids[order], rows[order], estimate[order], qctr[order], value[order],
                    {k: v for k, v in dropped.items() if v})
