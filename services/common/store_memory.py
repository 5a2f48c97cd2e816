"""MemoryStore: the in-process online store, the embedded default when REDIS_URL is unset.

Same records and semantics as RedisStore (sequence cap, newest first, TTL'd caps and
de-duplication markers, catalog versions), kept in dicts. It is meant for one event loop in
one process: every method runs without awaiting, so each call is atomic on that loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from services.common.store import (
    CAP_TTL_S,
    CHANGED_KEEP_S,
    CHANGED_KINDS,
    DEFAULT_SEQUENCE_LEN,
    SPEND_TTL_S,
    Ad,
    Campaign,
    CatalogChanges,
    UserContext,
    UserId,
    UserProfile,
    check_changed_kind,
    check_status,
    decode_profile,
    profile_fields,
    utc_day,
)


class MemoryStore:
    """OnlineStore in process memory. `clock` (monotonic seconds) is injectable for tests."""

    def __init__(self, sequence_len: int = DEFAULT_SEQUENCE_LEN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sequence_len = sequence_len
        self._clock = clock
        self._users: dict[str, dict[str, str]] = {}
        self._seqs: dict[str, deque[tuple[int, int]]] = {}
        self._ads: dict[int, Ad] = {}
        self._campaigns: dict[int, Campaign] = {}
        self._qs: dict[int, list[int]] = {}
        # wall-clock time each counter last moved, per kind (see OnlineStore.changed_since)
        self._changed: dict[str, dict[int, float]] = {k: {} for k in CHANGED_KINDS}
        self._caps: dict[tuple[str, str], tuple[float, dict[int, int]]] = {}
        self._spend: dict[tuple[int, str], tuple[float, int]] = {}
        self._events: dict[str, float] = {}
        self._slots: dict[tuple[str, str, int], float] = {}  # apart from client event ids
        self._version = 0
        self._bulk_version = 0
        self._changes: dict[str, int] = {}
        self._sweep_at = 0.0

    def _sweep(self, now: float) -> None:
        """Drop expired markers now and then, so a long-running demo does not grow forever."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + 60.0
        self._events = {k: t for k, t in self._events.items() if t > now}
        self._slots = {k: t for k, t in self._slots.items() if t > now}
        self._caps = {k: v for k, v in self._caps.items() if v[0] > now}
        self._spend = {k: v for k, v in self._spend.items() if v[0] > now}

    # -- users -------------------------------------------------------------------------------
    async def get_user_context(self, user_id: UserId, day: str | None = None) -> UserContext:
        uid = str(user_id)
        profile = self._users.get(uid)
        seq = list(self._seqs.get(uid, ()))
        expires, caps = self._caps.get((uid, day or utc_day()), (0.0, {}))
        return UserContext(
            profile=decode_profile(profile) if profile else None,
            hist_ad_id=[a for a, _ in seq],
            hist_category_id=[c for _, c in seq],
            caps=dict(caps) if expires > self._clock() else {},
        )

    async def push_behaviour(self, user_id: UserId, ad_id: int, category_id: int) -> None:
        seq = self._seqs.setdefault(str(user_id), deque(maxlen=self.sequence_len))
        seq.appendleft((int(ad_id), int(category_id)))

    async def put_users(self, rows: Iterable[UserProfile | Mapping[str, Any]]) -> int:
        written = 0
        for row in rows:
            user_id, mapping = profile_fields(row)
            # Stored as strings, like a Redis hash, so both stores decode profiles alike.
            self._users.setdefault(str(user_id), {}).update(
                {k: str(v) for k, v in mapping.items()})
            written += 1
        return written

    async def put_sequences(
            self, rows: Iterable[tuple[UserId, Iterable[int], Iterable[int]]]) -> int:
        written = 0
        for user_id, ads, cats in rows:
            entries = [(a, c) for a, c in zip(ads, cats, strict=False) if a >= 0 or c >= 0]
            self._seqs[str(user_id)] = deque(entries[: self.sequence_len],
                                             maxlen=self.sequence_len)
            written += 1
        return written

    # -- catalog -----------------------------------------------------------------------------
    def _bump_bulk(self) -> None:
        self._version += 1
        self._bulk_version = self._version

    def _bump(self, member: str) -> None:
        self._version += 1
        self._changes[member] = self._version

    async def put_ads(self, rows: Iterable[Ad]) -> int:
        written = 0
        for ad in rows:
            self._ads[ad.ad_id] = ad
            written += 1
        if written:
            self._bump_bulk()
        return written

    async def put_campaigns(self, rows: Iterable[Campaign]) -> int:
        written = 0
        for campaign in rows:
            self._campaigns[campaign.campaign_id] = campaign
            written += 1
        if written:
            self._bump_bulk()
        return written

    async def get_ads(self, ad_ids: Iterable[int]) -> dict[int, Ad]:
        ads = self._ads
        return {int(a): ads[int(a)] for a in ad_ids if int(a) in ads}

    async def iter_ads(self, batch: int = 5000) -> AsyncIterator[list[Ad]]:
        ads = list(self._ads.values())
        for start in range(0, len(ads), batch):
            yield ads[start:start + batch]

    async def all_ads(self) -> list[Ad]:
        return list(self._ads.values())

    async def get_campaigns(self, campaign_ids: Iterable[int] | None = None
                            ) -> dict[int, Campaign]:
        if campaign_ids is None:
            return dict(self._campaigns)
        return {int(c): self._campaigns[int(c)] for c in campaign_ids
                if int(c) in self._campaigns}

    async def upsert_ad(self, ad: Ad) -> None:
        check_status(ad.status)
        self._ads[ad.ad_id] = ad
        self._bump(f"ad:{ad.ad_id}")

    async def upsert_campaign(self, campaign: Campaign) -> None:
        check_status(campaign.status)
        self._campaigns[campaign.campaign_id] = campaign
        self._bump(f"campaign:{campaign.campaign_id}")

    async def set_ad_status(self, ad_id: int, status: str) -> bool:
        check_status(status)
        ad = self._ads.get(int(ad_id))
        if ad is None:
            return False
        self._ads[ad.ad_id] = replace(ad, status=status)
        self._bump(f"ad:{ad.ad_id}")
        return True

    async def set_campaign_status(self, campaign_id: int, status: str) -> bool:
        check_status(status)
        campaign = self._campaigns.get(int(campaign_id))
        if campaign is None:
            return False
        self._campaigns[campaign.campaign_id] = replace(campaign, status=status)
        self._bump(f"campaign:{campaign.campaign_id}")
        return True

    async def catalog_version(self) -> int:
        return self._version

    async def catalog_baseline(self) -> int:
        return self._bulk_version

    async def catalog_changes(self, since: int) -> CatalogChanges:
        members = sorted((v, m) for m, v in self._changes.items() if v > since)
        ads = tuple(int(m[3:]) for _, m in members if m.startswith("ad:"))
        camps = tuple(int(m[9:]) for _, m in members if m.startswith("campaign:"))
        return CatalogChanges(self._version, ads, camps, self._bulk_version > since)

    # -- counters ----------------------------------------------------------------------------
    async def incr_qscore(self, ad_id: int, impressions: int = 0, clicks: int = 0) -> None:
        counts = self._qs.setdefault(int(ad_id), [0, 0])
        counts[0] += int(impressions)
        counts[1] += int(clicks)
        self._changed["qs"][int(ad_id)] = time.time()

    async def get_qscores(self, ad_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for ad_id in ad_ids:
            imp, clk = self._qs.get(int(ad_id), (0, 0))
            out[int(ad_id)] = (imp, clk)
        return out

    async def incr_cap(self, user_id: UserId, day: str, campaign_id: int, n: int = 1) -> int:
        now = self._clock()
        self._sweep(now)
        key = (str(user_id), day)
        expires, caps = self._caps.get(key, (0.0, {}))
        if expires <= now:
            caps = {}
        caps[int(campaign_id)] = caps.get(int(campaign_id), 0) + int(n)
        self._caps[key] = (now + CAP_TTL_S, caps)
        return caps[int(campaign_id)]

    async def incr_spend(self, campaign_id: int, day: str, micros: int) -> int:
        now = self._clock()
        key = (int(campaign_id), day)
        expires, total = self._spend.get(key, (0.0, 0))
        total = (total if expires > now else 0) + int(micros)
        self._spend[key] = (now + SPEND_TTL_S, total)
        self._changed["spend"][int(campaign_id)] = time.time()
        return total

    async def changed_since(self, kind: str, since: float) -> list[int]:
        changed = self._changed[check_changed_kind(kind)]
        horizon = time.time() - CHANGED_KEEP_S
        for stale in [i for i, t in changed.items() if t < horizon]:
            del changed[stale]
        return [i for i, t in changed.items() if t > since]

    async def get_spend(self, campaign_ids: Iterable[int], day: str) -> dict[int, int]:
        now = self._clock()
        out: dict[int, int] = {}
        for cid in campaign_ids:
            expires, total = self._spend.get((int(cid), day), (0.0, 0))
            out[int(cid)] = total if expires > now else 0
        return out

    async def dedupe_event(self, event_id: str, window_s: float) -> bool:
        now = self._clock()
        self._sweep(now)
        if self._events.get(event_id, 0.0) > now:
            return False
        self._events[event_id] = now + max(0.001, float(window_s))
        return True

    async def claim_slot(self, event_type: str, request_id: str, ad_id: int,
                         window_s: float) -> bool:
        now = self._clock()
        self._sweep(now)
        key = (event_type, request_id, int(ad_id))
        if self._slots.get(key, 0.0) > now:
            return False
        self._slots[key] = now + max(0.001, float(window_s))
        return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
