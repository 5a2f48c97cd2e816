"""Budget pacing: which campaigns may serve right now, decided from a local snapshot.

The request path must not read Redis per campaign, so a `Pacer` keeps a `PacingState` (every
campaign's daily budget, status and today's spend) that it refreshes from the store at least every
second (`refresh_s`); `allows()` is then a dictionary lookup and some arithmetic.

Pacing rule (uniform schedule over the UTC day):

- `spend >= budget` (or status paused, or budget 0): the campaign does not serve.
- otherwise, with `spend_share = spend / budget` and `day_share` = share of the UTC day gone,
  `ahead = spend_share - day_share - slack`. If `ahead <= 0` the campaign serves every request;
  else it serves with probability `max(0, 1 - ahead / band)`. So a campaign may run `slack`
  (default 2% of budget) ahead of the schedule freely, is throttled linearly over the next `band`
  (5%), and is fully off beyond that until the clock catches up. A proportional controller with no
  hidden state: the same snapshot, time and random draw always give the same answer.
- In-flight holds: every slot the gateway serves may still be clicked before the click reaches
  the store, so `note_served(campaign, micros)` holds the slot's expected cost (price x pCTR) for
  `hold_s` seconds (the event-lag horizon) and `allows()` counts holds as spend. This keeps
  delivery tight near the end of a budget; being an expectation, it is not the guarantee.

Overspend guarantee (the hard bound, proven where spend is charged, in the worker): a click is
charged `billable_micros(price, spend_before, budget)`, i.e. in full while the campaign is under
budget, and beyond it only up to the allowance `max(price, budget // 100)`. So for every campaign
and day `spend <= budget + max(largest click price, 1% of budget)`, however late events arrive and
however many slots were served before the snapshot showed the budget spent. Clicks beyond the
allowance are still counted (Qscore, labels) but cost the advertiser nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from services.common.store import Campaign, OnlineStore, utc_day

log = logging.getLogger(__name__)
DAY_S = 86_400


def day_share(now: float) -> float:
    """Share of the UTC day gone at Unix time `now` (0 at midnight, -> 1 at the next)."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    return min(1.0, max(0.0, (now - midnight) / DAY_S))


def overspend_allowance(price_micros: int, budget_micros: int) -> int:
    """How far past its budget one click may take a campaign: max(click price, 1% of budget)."""
    return max(int(price_micros), int(budget_micros) // 100)


def billable_micros(price_micros: int, spend_before: int, budget_micros: int) -> int:
    """What a click of `price_micros` is charged when today's spend was `spend_before`.

    Full price while the campaign is under budget (the allowance always covers one click), then
    only what is left of `budget + allowance`, then nothing.
    """
    cap = int(budget_micros) + overspend_allowance(price_micros, budget_micros)
    return max(0, min(int(price_micros), cap - int(spend_before)))


def serve_probabilities(spend_micros: np.ndarray, budget_micros: np.ndarray,
                        share_of_day: float, slack: float = 0.02,
                        band: float = 0.05) -> np.ndarray:
    """The pacing rule of the module docstring, as a pure function over arrays."""
    spend = np.asarray(spend_micros, dtype=np.float64)
    budget = np.asarray(budget_micros, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ahead = spend / budget - share_of_day - slack
    p = np.where(ahead <= 0.0, 1.0, np.clip(1.0 - ahead / band, 0.0, 1.0))
    return np.where((budget > 0) & (spend < budget), p, 0.0)


def serve_probability(spend_micros: int, budget_micros: int, share_of_day: float,
                      slack: float = 0.02, band: float = 0.05) -> float:
    """One campaign's serve probability (`serve_probabilities` for a single value)."""
    return float(serve_probabilities(spend_micros, budget_micros, share_of_day, slack, band))


CHANGE_SKEW_S = 2.0  # re-read changes this much older than the last read (clock skew, races)


@dataclass(frozen=True, slots=True)
class PacingConfig:
    """Knobs of the pacing rule (see the module docstring)."""

    slack: float = 0.02
    band: float = 0.05
    refresh_s: float = 1.0
    hold_s: float = 5.0


@dataclass(frozen=True, slots=True)
class CampaignState:
    """One campaign as pacing sees it: budget, status and spend for `PacingState.day`."""

    campaign_id: int
    daily_budget_micros: int
    status: str
    spend_micros: int


@dataclass(frozen=True, slots=True)
class PacingState:
    """An immutable snapshot: swapped whole on refresh, so a request sees one consistent view."""

    day: str
    taken_at: float
    campaigns: dict[int, CampaignState] = field(default_factory=dict)
    columns: PacingColumns | None = None  # the same campaigns as sorted arrays (vectorised)


@dataclass(frozen=True, slots=True)
class PacingColumns:
    """Campaign states as sorted numpy columns: one request asks about ~1,000 campaigns,
    which a Python loop over `CampaignState`s cannot answer within a millisecond."""

    ids: np.ndarray  # int64, sorted
    budget: np.ndarray  # int64 micros
    spend: np.ndarray  # int64 micros
    active: np.ndarray  # bool

    @classmethod
    def build(cls, campaigns: dict[int, CampaignState]) -> PacingColumns:
        ids = np.fromiter(campaigns.keys(), np.int64, len(campaigns))
        order = np.argsort(ids)
        states = list(campaigns.values())
        budget = np.fromiter((c.daily_budget_micros for c in states), np.int64, len(states))
        spend = np.fromiter((c.spend_micros for c in states), np.int64, len(states))
        active = np.fromiter((c.status == "active" for c in states), bool, len(states))
        return cls(ids[order], budget[order], spend[order], active[order])

    def with_spend(self, spend: dict[int, int]) -> PacingColumns:
        """A copy with new spend for some campaigns (ids it does not hold are ignored)."""
        if not spend:
            return self
        new = self.spend.copy()
        ids = np.fromiter(spend.keys(), np.int64, len(spend))
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(self.ids.size - 1, 0))
        hit = self.ids[pos] == ids if self.ids.size else np.zeros(ids.size, bool)
        new[pos[hit]] = np.fromiter(spend.values(), np.int64, len(spend))[hit]
        return PacingColumns(self.ids, self.budget, new, self.active)


class Pacer:
    """Holds the current `PacingState`, refreshes it from the store, answers `allows()`."""

    def __init__(self, store: OnlineStore, config: PacingConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config or PacingConfig()
        self._clock = clock
        self.state = PacingState(day="", taken_at=0.0)
        self._catalog_version = -1
        self._campaigns: dict[int, Campaign] = {}
        self._holds: deque[tuple[float, int, float]] = deque()  # (expires, campaign, micros)
        self._held: dict[int, float] = {}
        self._changes_read_at = 0.0  # wall clock of the last spend read

    async def refresh(self, now: float | None = None) -> PacingState:
        """Re-read budgets/statuses (only when the catalog changed) and today's spend.

        A full read happens at start, on a new UTC day and after catalog changes; otherwise
        only campaigns whose spend moved since the last refresh are re-read
        (`store.changed_since('spend')`, marked by whichever replica's worker charged them),
        so a 150k-campaign catalog costs O(changes) per second, not O(catalog).
        """
        now = self._clock() if now is None else now
        version = await self.store.catalog_version()
        day = utc_day(now)
        full = version != self._catalog_version or not self._campaigns or day != self.state.day
        if version != self._catalog_version or not self._campaigns:
            self._campaigns = await self.store.get_campaigns()
            self._catalog_version = version
        read_at = time.time()
        if full:
            ids = set(self._campaigns)
            campaigns: dict[int, CampaignState] = {}
        else:
            changed = await self.store.changed_since("spend", self._changes_read_at - CHANGE_SKEW_S)
            ids = set(changed) & self._campaigns.keys()
            campaigns = dict(self.state.campaigns)
        spend = await self.store.get_spend(ids, day) if ids else {}
        for cid in ids:
            c = self._campaigns[cid]
            campaigns[cid] = CampaignState(cid, c.daily_budget_micros, c.status,
                                           spend.get(cid, 0))
        self._changes_read_at = read_at
        columns = self.state.columns
        if full or columns is None:
            columns = await asyncio.to_thread(PacingColumns.build, campaigns)
        else:
            columns = columns.with_spend(spend)
        self.state = PacingState(day, now, campaigns, columns)
        return self.state

    def note_campaign(self, campaign: Campaign) -> None:
        """An admin write, visible to pacing at once rather than at the next refresh."""
        self._campaigns[campaign.campaign_id] = campaign
        spend = self.state.campaigns.get(campaign.campaign_id)
        campaigns = dict(self.state.campaigns)
        campaigns[campaign.campaign_id] = CampaignState(
            campaign.campaign_id, campaign.daily_budget_micros, campaign.status,
            spend.spend_micros if spend else 0)
        # columns=None: `eligible` answers from the dict until the next refresh rebuilds them
        self.state = PacingState(self.state.day, self.state.taken_at, campaigns)

    def note_served(self, campaign_id: int, expected_micros: float,
                    now: float | None = None) -> None:
        """Hold a served slot's expected click cost until its click has had time to land."""
        now = self._clock() if now is None else now
        self._expire_holds(now)
        self._holds.append((now + self.config.hold_s, campaign_id, expected_micros))
        self._held[campaign_id] = self._held.get(campaign_id, 0.0) + expected_micros

    def _expire_holds(self, now: float) -> None:
        while self._holds and self._holds[0][0] <= now:
            _, cid, micros = self._holds.popleft()
            left = self._held.get(cid, 0.0) - micros
            if left <= 1e-9:
                self._held.pop(cid, None)
            else:
                self._held[cid] = left

    def probability(self, campaign_id: int, now: float | None = None) -> float:
        """Serve probability for this campaign now (0 for unknown, paused or spent campaigns)."""
        now = self._clock() if now is None else now
        state = self.state.campaigns.get(campaign_id)
        if state is None or state.status != "active":
            return 0.0
        today, share = self._calendar(now)
        if today != self.state.day:  # the day rolled over since the snapshot
            spend = 0
        else:
            self._expire_holds(now)
            spend = state.spend_micros + int(self._held.get(campaign_id, 0.0))
        return serve_probability(spend, state.daily_budget_micros, share,
                                 self.config.slack, self.config.band)

    def _calendar(self, now: float) -> tuple[str, float]:
        """(UTC day, share of day gone), memoised per 10 ms: a request asks for every
        candidate campaign at the same `now`, and datetime formatting per campaign would cost
        more than the rest of screening (added by the gateway engineer)."""
        key = int(now * 100)
        cached = getattr(self, "_calendar_memo", None)
        if cached is None or cached[0] != key:
            cached = (key, utc_day(now), day_share(now))
            self._calendar_memo = cached
        return cached[1], cached[2]

    def allows(self, campaign_id: int, now: float | None = None,
               draw: float | None = None) -> bool:
        """Whether this request may show this campaign; `draw` in [0, 1) (random if None)."""
        p = self.probability(campaign_id, now)
        if p >= 1.0:
            return True
        if p <= 0.0:
            return False
        return (random.random() if draw is None else draw) < p

    def eligible(self, campaign_ids: Iterable[int], now: float | None = None,
                 rng: random.Random | None = None) -> set[int]:
        """The campaigns of one request that pace in (one draw per campaign per request).

        Vectorised over the snapshot's columns; the same rule as `probability`."""
        now = self._clock() if now is None else now
        ids = np.unique(np.fromiter((int(c) for c in campaign_ids), np.int64))
        cols = self.state.columns
        if cols is None or not ids.size or not cols.ids.size:
            rand = (rng or random).random
            return {cid for cid in ids.tolist() if self.allows(cid, now, rand())}
        pos = np.clip(np.searchsorted(cols.ids, ids), 0, cols.ids.size - 1)
        known = (cols.ids[pos] == ids) & cols.active[pos]
        today, share = self._calendar(now)
        if today != self.state.day:
            spend = np.zeros(ids.size, np.float64)
        else:
            self._expire_holds(now)
            held = self._held
            spend = cols.spend[pos] + np.fromiter((held.get(c, 0.0) for c in ids.tolist()),
                                                  np.float64, ids.size)
        p = serve_probabilities(spend, cols.budget[pos], share, self.config.slack,
                                self.config.band)
        p = np.where(known, p, 0.0)
        draws = np.fromiter(((rng or random).random() for _ in range(ids.size)), np.float64,
                            ids.size)
        return set(ids[(p >= 1.0) | (draws < p)].tolist())

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every `refresh_s` until `stop` is set; a failed refresh keeps the old view."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a store hiccup must not stop pacing
                log.exception("pacing refresh failed; keeping the snapshot from %.0f",
                              self.state.taken_at)
            try:
                await asyncio.wait_for(stop.wait(), self.config.refresh_s)
            except TimeoutError:
                pass
