"""The gateway's local catalog snapshot: every ad and campaign, as columns, in process memory.

Why a snapshot: screening looks at up to 2,000 candidates per request, and reading `ad:{id}`
hashes from Redis per candidate would cost more than the whole ranking budget. The snapshot is
loaded from the store at start-up and refreshed incrementally from `store.catalog_changes`
every `refresh_s` (1 s): only the ads and campaigns edited since the last version are re-read,
and a bulk load (which the change list does not cover) triggers a full reload.

Columns are numpy arrays row-aligned with `ad_ids`, so screening is a handful of vectorised
gathers over candidate rows instead of a Python loop. Scene targeting is a bit mask per ad
(bit i = the i-th scene in `scenes`); scenes unknown to the gateway get no bit and never match.
Admin writes are applied to the snapshot at once (`apply_ad`, `apply_campaign`), so a new or
paused ad takes effect on the next request rather than after the next refresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.store import Ad, Campaign, OnlineStore

log = logging.getLogger(__name__)

ACTIVE = "active"


@dataclass
class CatalogColumns:
    """Row-aligned columns of the ads (row i describes `ad_ids[i]`)."""

    ad_ids: np.ndarray  # int64
    campaign_id: np.ndarray  # int64
    category_id: np.ndarray  # int64
    ocpa: np.ndarray  # bool: bid type oCPA
    bid_micros: np.ndarray  # int64
    target_cpa_micros: np.ndarray  # int64
    active: np.ndarray  # bool: the ad's own status
    scene_bits: np.ndarray  # int64 bit mask over the gateway's scene list

    @classmethod
    def empty(cls) -> CatalogColumns:
        i64 = np.empty(0, np.int64)
        return cls(i64, i64, i64, np.empty(0, bool), i64, i64, np.empty(0, bool), i64)


@dataclass
class Catalog:
    """Ads + campaigns snapshot with an id -> row index (see the module docstring)."""

    scenes: Sequence[str]
    ads: dict[int, Ad] = field(default_factory=dict)
    campaigns: dict[int, Campaign] = field(default_factory=dict)
    version: int = -1
    cols: CatalogColumns = field(default_factory=CatalogColumns.empty)
    _row: dict[int, int] = field(default_factory=dict)
    _sorted_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    _sorted_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    _active_campaigns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    # -- building ------------------------------------------------------------------------------
    def scene_bit(self, scene: str) -> int:
        try:
            return 1 << list(self.scenes).index(scene)
        except ValueError:
            return 0

    def _bits(self, scenes: Iterable[str]) -> int:
        bits = 0
        for name in scenes:
            bits |= self.scene_bit(name)
        return bits

    def _rebuild(self) -> None:
        ads = list(self.ads.values())
        self.cols = CatalogColumns(
            ad_ids=np.fromiter((a.ad_id for a in ads), np.int64, len(ads)),
            campaign_id=np.fromiter((a.campaign_id for a in ads), np.int64, len(ads)),
            category_id=np.fromiter((a.category_id for a in ads), np.int64, len(ads)),
            ocpa=np.fromiter((a.bid_type == "ocpa" for a in ads), bool, len(ads)),
            bid_micros=np.fromiter((a.bid_micros for a in ads), np.int64, len(ads)),
            target_cpa_micros=np.fromiter((a.target_cpa_micros for a in ads), np.int64, len(ads)),
            active=np.fromiter((a.status == ACTIVE for a in ads), bool, len(ads)),
            scene_bits=np.fromiter((self._bits(a.scenes) for a in ads), np.int64, len(ads)),
        )
        self._row = {a.ad_id: i for i, a in enumerate(ads)}
        order = np.argsort(self.cols.ad_ids, kind="stable")
        self._sorted_ids = self.cols.ad_ids[order]
        self._sorted_rows = order.astype(np.int64)

    def _set_row(self, row: int, ad: Ad) -> None:
        c = self.cols
        c.campaign_id[row] = ad.campaign_id
        c.category_id[row] = ad.category_id
        c.ocpa[row] = ad.bid_type == "ocpa"
        c.bid_micros[row] = ad.bid_micros
        c.target_cpa_micros[row] = ad.target_cpa_micros
        c.active[row] = ad.status == ACTIVE
        c.scene_bits[row] = self._bits(ad.scenes)

    def replace_all(self, ads: Iterable[Ad], campaigns: Iterable[Campaign], version: int) -> None:
        self.ads = {a.ad_id: a for a in ads}
        self.campaigns = {c.campaign_id: c for c in campaigns}
        self.version = version
        self._rebuild()
        self._rebuild_campaigns()

    def _rebuild_campaigns(self) -> None:
        """Sorted ids of the active campaigns: screening tests membership vectorised."""
        live = [cid for cid, c in self.campaigns.items() if c.status == ACTIVE]
        self._active_campaigns = np.sort(np.asarray(live, dtype=np.int64))

    def apply_ad(self, ad: Ad) -> None:
        """Insert or update one ad (admin writes and incremental refresh)."""
        self.ads[ad.ad_id] = ad
        row = self._row.get(ad.ad_id)
        if row is None:
            self._rebuild()  # O(ads); new ads are rare next to requests
        else:
            self._set_row(row, ad)

    def apply_campaign(self, campaign: Campaign) -> None:
        self.campaigns[campaign.campaign_id] = campaign
        self._rebuild_campaigns()

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ads)

    def rows_of(self, ad_ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 for ids the snapshot does not know (vectorised)."""
        ids = np.asarray(ad_ids, dtype=np.int64)
        if not self._sorted_ids.size or not ids.size:
            return np.full(ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, self._sorted_ids.size - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._sorted_rows[pos], -1)

    def campaign_active(self, campaign_ids: np.ndarray) -> np.ndarray:
        """True where the campaign exists and is active (a missing campaign never serves)."""
        ids = np.asarray(campaign_ids, dtype=np.int64)
        live = self._active_campaigns
        if not live.size or not ids.size:
            return np.zeros(ids.shape, bool)
        pos = np.clip(np.searchsorted(live, ids), 0, live.size - 1)
        return live[pos] == ids

    # -- syncing with the store ----------------------------------------------------------------
    async def load(self, store: OnlineStore) -> None:
        version = await store.catalog_version()
        ads: list[Ad] = []
        async for batch in store.iter_ads():
            ads += batch
        campaigns = await store.get_campaigns()
        self.replace_all(ads, campaigns.values(), version)
        log.info("catalog snapshot: %d ads, %d campaigns (version %d)", len(self.ads),
                 len(self.campaigns), version)

    async def refresh(self, store: OnlineStore) -> int:
        """Apply what changed since our version; the number of records re-read."""
        changes = await store.catalog_changes(self.version)
        if changes.full_reload:
            await self.load(store)
            return len(self.ads)
        if changes.version == self.version:
            return 0
        if changes.ad_ids:
            fresh = await store.get_ads(changes.ad_ids)
            for ad in fresh.values():
                self.apply_ad(ad)
        if changes.campaign_ids:
            fresh_campaigns = await store.get_campaigns(changes.campaign_ids)
            for campaign in fresh_campaigns.values():
                self.apply_campaign(campaign)
        self.version = changes.version
        return len(changes.ad_ids) + len(changes.campaign_ids)

    async def run(self, store: OnlineStore, stop: asyncio.Event, refresh_s: float = 1.0) -> None:
        """Refresh every `refresh_s` until `stop`; a failed refresh keeps the old snapshot."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), refresh_s)
            except TimeoutError:
                pass
            if stop.is_set():
                return
            try:
                await self.refresh(store)
            except Exception:  # noqa: BLE001 - a store hiccup must not stop serving
                log.exception("catalog refresh failed; keeping version %d", self.version)
