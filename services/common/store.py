"""The online store: one async interface, two implementations (Redis and in-process).

The gateway and the event worker only ever see `OnlineStore`. `RedisStore` is the real
deployment; `MemoryStore` is the embedded default when `REDIS_URL` is unset, so `make demo`
needs no server. Both hold the same records with the same semantics, and the tests run one
test body against both.

Keys (all under `Settings.redis_prefix`, see ARCHITECTURE.md):

    user:{id}               hash   profile fields (the users.parquet columns)
    seq:{id}                list   "ad_id:category_id", newest first, capped at sequence_len
    cap:{id}:{day}          hash   impressions per campaign that UTC day (TTL ~2 days)
    ad:{id}                 hash   Ad fields (scenes comma-joined)
    campaign:{id}           hash   Campaign fields
    ads / campaigns         set    ids present (lets the catalog snapshot avoid a SCAN)
    qs:{ad}                 hash   impressions, clicks
    spend:{campaign}:{day}  int    micros charged that UTC day (TTL 8 days)
    evt:{event_id}          string de-duplication marker of a client event id (SET NX PX)
    slot:{type}:{req}:{ad}  string the worker applied this event type for this served slot
    {catalog}:version       int    bumped by every ad / campaign write
    {catalog}:changes       zset   "ad:{id}" / "campaign:{id}" scored by the version of the edit
    {catalog}:bulk          int    catalog version of the last bulk load (put_ads/put_campaigns)

Names in braces are Redis Cluster hash tags (literal braces in the key): `user:{42}`,
`seq:{42}`, `cap:{42}:{day}` share a slot; `qs:{ad}` and `spend:{campaign}:{day}` carry their
id as tag so the worker's per-record markers can share their slot on a cluster. The event log's
keys are in services/common/events.py.

Money is integer micros; a day is the UTC date string YYYYMMDD.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from services.common.config import Settings

CAP_TTL_S = 2 * 86_400  # a cap hash outlives its UTC day by a day, so late events still land
SPEND_TTL_S = 8 * 86_400  # a week of daily spend stays readable for reports
DEFAULT_SEQUENCE_LEN = 50

UserId = int | str


def utc_day(ts: float | None = None) -> str:
    """The UTC day (YYYYMMDD) that budgets and frequency caps reset on."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.strftime("%Y%m%d")


def _to_int(value: Any, default: int = 0) -> int:
    if value is None or value == "":
        return default
    return int(value)


@dataclass(frozen=True, slots=True)
class Ad:
    """One ad as the serving path needs it (mirrors ads.parquet)."""

    ad_id: int
    campaign_id: int
    advertiser_id: int
    category_id: int
    category_l1: int = 0
    brand_id: int = 0
    price_micros: int = 0
    price_bucket: int = 0
    bid_type: str = "cpc"  # 'cpc' | 'ocpa'
    bid_micros: int = 0  # CPC max bid per click; 0 for oCPA
    target_cpa_micros: int = 0  # 0 for CPC
    scenes: tuple[str, ...] = ()
    creative_id: str = ""
    status: str = "active"  # 'active' | 'paused'

    def to_fields(self) -> dict[str, str | int]:
        """Flat hash fields: scalars as-is, scenes comma-joined (never pickled)."""
        out: dict[str, str | int] = {}
        for f in fields(self):
            if f.name == "ad_id":
                continue
            value = getattr(self, f.name)
            out[f.name] = ",".join(value) if f.name == "scenes" else value
        return out

    @classmethod
    def from_fields(cls, ad_id: int, raw: Mapping[str, Any]) -> Ad:
        scenes = raw.get("scenes") or ""
        if not isinstance(scenes, str):
            scenes = ",".join(scenes)
        return cls(
            ad_id=int(ad_id),
            campaign_id=_to_int(raw.get("campaign_id")),
            advertiser_id=_to_int(raw.get("advertiser_id")),
            category_id=_to_int(raw.get("category_id")),
            category_l1=_to_int(raw.get("category_l1")),
            brand_id=_to_int(raw.get("brand_id")),
            price_micros=_to_int(raw.get("price_micros")),
            price_bucket=_to_int(raw.get("price_bucket")),
            bid_type=str(raw.get("bid_type") or "cpc"),
            bid_micros=_to_int(raw.get("bid_micros")),
            target_cpa_micros=_to_int(raw.get("target_cpa_micros")),
            scenes=tuple(s for s in scenes.split(",") if s),
            creative_id=str(raw.get("creative_id") or ""),
            status=str(raw.get("status") or "active"),
        )


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign's budget and status (mirrors campaigns.parquet)."""

    campaign_id: int
    advertiser_id: int = 0
    daily_budget_micros: int = 0
    status: str = "active"

    def to_fields(self) -> dict[str, str | int]:
        return {"advertiser_id": self.advertiser_id,
                "daily_budget_micros": self.daily_budget_micros, "status": self.status}

    @classmethod
    def from_fields(cls, campaign_id: int, raw: Mapping[str, Any]) -> Campaign:
        return cls(int(campaign_id), _to_int(raw.get("advertiser_id")),
                   _to_int(raw.get("daily_budget_micros")), str(raw.get("status") or "active"))


@dataclass(frozen=True, slots=True)
class UserProfile:
    """A marketplace user's profile (mirrors users.parquet). Other datasets (Ali-CCP) bring
    other profile columns: the store keeps whatever columns `put_users` gets."""

    user_id: int
    age_bucket: int = 0
    gender: str = "unknown"
    city_tier: int = 0

    def to_fields(self) -> dict[str, str | int]:
        return {k: v for k, v in asdict(self).items() if k != "user_id"}


@dataclass(slots=True)
class UserContext:
    """Everything one request needs about a user, read in one round trip.

    `profile` is None for an unknown user (the cold-start path). Sequences are newest first.
    `caps` maps campaign id -> impressions shown to this user in the current UTC day.
    """

    profile: dict[str, int | str] | None
    hist_ad_id: list[int] = field(default_factory=list)
    hist_category_id: list[int] = field(default_factory=list)
    caps: dict[int, int] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.profile is not None


@dataclass(frozen=True, slots=True)
class CatalogChanges:
    """What changed in the catalog since a version the caller had (for snapshot refresh).

    `full_reload` is True when a bulk load happened after `since`: the per-id change list does
    not cover bulk loads, so the caller rebuilds its snapshot from `iter_ads()`.
    """

    version: int
    ad_ids: tuple[int, ...]
    campaign_ids: tuple[int, ...]
    full_reload: bool


def ad_features(ad: Ad) -> dict[str, str | int]:
    """The raw features a stage's ad towers need for an ad the bundle does not know (the
    `CatalogUpdate.features` of admin pushes and of the stages' own catalog catch-up)."""
    return {"ad_id": ad.ad_id, "campaign_id": ad.campaign_id, "advertiser_id": ad.advertiser_id,
            "category_id": ad.category_id, "brand_id": ad.brand_id,
            "price_bucket": ad.price_bucket, "bid_type": ad.bid_type}


def decode_profile(raw: Mapping[str, str]) -> dict[str, int | str]:
    """Hash values come back as strings; integer-looking values become ints again."""
    out: dict[str, int | str] = {}
    for key, value in raw.items():
        text = value.decode() if isinstance(value, bytes) else str(value)
        digits = text[1:] if text.startswith("-") else text
        out[key] = int(text) if digits.isdigit() else text
    return out


def profile_fields(row: UserProfile | Mapping[str, Any]) -> tuple[UserId, dict[str, str | int]]:
    """(user_id, flat fields) for a profile record or a users.parquet row."""
    if isinstance(row, UserProfile):
        return row.user_id, row.to_fields()
    data = dict(row)
    user_id = data.pop("user_id")
    return user_id, {k: v if isinstance(v, int | str) else str(v) for k, v in data.items()}


@runtime_checkable
class OnlineStore(Protocol):
    """The online store the serving path and the event worker use (see module docstring)."""

    sequence_len: int

    async def get_user_context(self, user_id: UserId, day: str | None = None) -> UserContext: ...
    async def push_behaviour(self, user_id: UserId, ad_id: int, category_id: int) -> None: ...
    async def put_users(self, rows: Iterable[UserProfile | Mapping[str, Any]]) -> int: ...
    async def put_sequences(
        self, rows: Iterable[tuple[UserId, Iterable[int], Iterable[int]]]) -> int: ...
    async def put_ads(self, rows: Iterable[Ad]) -> int: ...
    async def put_campaigns(self, rows: Iterable[Campaign]) -> int: ...
    async def get_ads(self, ad_ids: Iterable[int]) -> dict[int, Ad]: ...
    def iter_ads(self, batch: int = 5000) -> AsyncIterator[list[Ad]]: ...
    async def all_ads(self) -> list[Ad]: ...
    async def get_campaigns(self, campaign_ids: Iterable[int] | None = None
                            ) -> dict[int, Campaign]: ...
    async def upsert_ad(self, ad: Ad) -> None: ...
    async def upsert_campaign(self, campaign: Campaign) -> None: ...
    async def set_ad_status(self, ad_id: int, status: str) -> bool: ...
    async def set_campaign_status(self, campaign_id: int, status: str) -> bool: ...
    async def catalog_version(self) -> int: ...
    async def catalog_changes(self, since: int) -> CatalogChanges: ...
    async def catalog_baseline(self) -> int:
        """The catalog version of the last bulk load (0: none). A bundle is trained on a bulk-
        loaded catalog, so a stage catches up with `catalog_changes(catalog_baseline())`."""
        ...
    async def incr_qscore(self, ad_id: int, impressions: int = 0, clicks: int = 0) -> None: ...
    async def get_qscores(self, ad_ids: Iterable[int]) -> dict[int, tuple[int, int]]: ...
    async def incr_cap(self, user_id: UserId, day: str, campaign_id: int, n: int = 1) -> int: ...
    async def incr_spend(self, campaign_id: int, day: str, micros: int) -> int: ...
    async def get_spend(self, campaign_ids: Iterable[int], day: str) -> dict[int, int]: ...
    async def changed_since(self, kind: str, since: float) -> list[int]:
        """Ids whose `kind` counter ('qs': ad Qscore counts, 'spend': campaign spend) moved
        after wall-clock time `since`: lets every gateway replica refresh its local snapshot
        of a million-ad catalog in O(changes), whichever replica's worker applied them."""
        ...
    async def dedupe_event(self, event_id: str, window_s: float) -> bool: ...
    async def claim_slot(self, event_type: str, request_id: str, ad_id: int,
                         window_s: float) -> bool:
        """True the first time within the window for this (type, request, ad). Its own key
        family, so no client-chosen event id (`dedupe_event`) can pre-claim a slot."""
        ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


CHANGED_KINDS = ("qs", "spend")
CHANGED_KEEP_S = 86_400.0  # change marks older than a day are trimmed


def check_changed_kind(kind: str) -> str:
    if kind not in CHANGED_KINDS:
        raise ValueError(f"unknown counter kind '{kind}' (expected one of {list(CHANGED_KINDS)})")
    return kind


def check_status(status: str) -> str:
    if status not in ("active", "paused"):
        raise ValueError(f"status must be 'active' or 'paused' (got {status!r})")
    return status


def make_store(settings: Settings, sequence_len: int = DEFAULT_SEQUENCE_LEN) -> OnlineStore:
    """RedisStore when `settings.redis_url` is set, else the in-process MemoryStore.

    `sequence_len` should be the served schema's `sequence_len`.
    """
    if settings.redis_url:
        from services.common.store_redis import RedisStore

        return RedisStore.from_url(settings.redis_url, prefix=settings.redis_prefix,
                                   sequence_len=sequence_len)
    from services.common.store_memory import MemoryStore

    return MemoryStore(sequence_len=sequence_len)


ProgressFn = Callable[[str, int, int], None]  # (what, rows just written, total rows of `what`)


def __getattr__(name: str) -> Any:
    """`from services.common.store import RedisStore, MemoryStore, load_marketplace` works
    without a circular import (the implementations import the records from here)."""
    if name == "RedisStore":
        from services.common.store_redis import RedisStore

        return RedisStore
    if name == "MemoryStore":
        from services.common.store_memory import MemoryStore

        return MemoryStore
    if name in ("load_marketplace", "LoadCounts"):
        from services.common import store_load

        return getattr(store_load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
