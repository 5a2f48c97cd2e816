"""Budget pacing: which campaigns may serve right now, decided from a local snapshot.

The request path must not read Redis per campaign, so a `Pacer` keeps today's spend per campaign
as a column row-aligned with the catalog's campaign columns (which hold budget and status), and
refreshes it from the store at least every second (`refresh_s`); a request's pacing is then a
few gathers and some arithmetic over its candidates' campaign rows (`serve_mask`).

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from services.common.store import OnlineStore, utc_day
from services.gateway.catalog import Catalog

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


def campaign_draws(campaign_rows: np.ndarray, seed: int) -> np.ndarray:
    """One uniform draw in [0, 1) per (request seed, campaign), vectorised: every candidate of
    a campaign sees the same draw, so a throttled campaign is in or out as a whole, without a
    per-request `np.unique` or a Python generator over campaigns."""
    with np.errstate(over="ignore"):
        mixed = (np.asarray(campaign_rows, np.uint64) + np.uint64(seed & 0xFFFFFFFF)
                 * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0x94D049BB133111EB)
        mixed ^= mixed >> np.uint64(29)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Pacer:
    """Today's spend and in-flight holds per campaign, row-aligned with the catalog's campaign
    columns (budget and status come from there), answering for many campaigns at once.

    The gateway passes its `Catalog`, which it refreshes itself (admin writes land there at
    once, so a paused or re-budgeted campaign is paced correctly on the next request, on the
    same vectorised path). Without one, the pacer keeps a catalog of its own and refreshes it.
    """

    def __init__(self, store: OnlineStore, config: PacingConfig | None = None,
                 clock: Callable[[], float] = time.time, catalog: Catalog | None = None) -> None:
        self.store = store
        self.config = config or PacingConfig()
        self._clock = clock
        self._own_catalog = catalog is None
        self.catalog = catalog if catalog is not None else Catalog(scenes=())
        self.day = ""
        self.taken_at = 0.0
        self._spend = np.zeros(0, np.float64)  # by campaign row: today's spend (micros)
        self._held = np.zeros(0, np.float64)  # by campaign row: in-flight expected cost
        self._holds: deque[tuple[float, int, float]] = deque()  # (expires, row, micros)
        self._changes_read_at = 0.0  # wall clock of the last spend read
        self._lock = threading.Lock()

    # -- columns -------------------------------------------------------------------------------
    def _columns(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Spend and held columns covering `n` campaign rows (grown with zeros: a campaign
        created since the last refresh has spent nothing the pacer knows of)."""
        n = max(n, 1)  # never empty: gathers at max(row, 0) must stay in bounds
        spend, held = self._spend, self._held
        if spend.size < n:
            with self._lock:
                spend, held = self._spend, self._held
                if spend.size < n:
                    size = max(n, 2 * spend.size)
                    spend = np.concatenate([spend, np.zeros(size - spend.size)])
                    held = np.concatenate([held, np.zeros(size - held.size)])
                    self._spend, self._held = spend, held
        return spend, held

    async def refresh(self, now: float | None = None) -> Pacer:
        """Re-read today's spend: all campaigns at start, on a new UTC day and after a bulk
        catalog load; otherwise only campaigns whose spend moved since the last refresh
        (`store.changed_since('spend')`, marked by whichever replica's worker charged them),
        so a 150k-campaign catalog costs O(changes) per second, not O(catalog)."""
        now = self._clock() if now is None else now
        if self._own_catalog:
            await self.catalog.refresh(self.store)
        view = self.catalog.view
        day = utc_day(now)
        full = day != self.day or self._spend.size < view.n_campaigns
        read_at = time.time()
        if full:
            ids = view.campaign_index.ids[:view.n_campaigns]
        else:
            changed = await self.store.changed_since("spend", self._changes_read_at - CHANGE_SKEW_S)
            ids = np.asarray(sorted(changed), np.int64)
        spend = await self.store.get_spend(ids.tolist(), day) if ids.size else {}
        rows = view.campaign_index.rows(ids)
        values = np.fromiter((spend.get(int(c), 0) for c in ids.tolist()), np.float64, ids.size)
        if full:
            fresh = np.zeros(max(view.n_campaigns, 1))
            fresh[rows[rows >= 0]] = values[rows >= 0]
            with self._lock:
                self._spend = fresh
                if self._held.size < fresh.size:
                    self._held = np.concatenate([self._held,
                                                 np.zeros(fresh.size - self._held.size)])
        else:
            current, _ = self._columns(view.n_campaigns)
            current[rows[rows >= 0]] = values[rows >= 0]
        self.day, self.taken_at, self._changes_read_at = day, now, read_at
        return self

    # -- decisions -----------------------------------------------------------------------------
    def probabilities(self, campaign_rows: np.ndarray, now: float | None = None) -> np.ndarray:
        """Serve probability per campaign row (0 for unknown rows (-1), paused or spent)."""
        now = self._clock() if now is None else now
        rows = np.asarray(campaign_rows, np.int64)
        view = self.catalog.view
        known = rows >= 0
        safe = np.maximum(rows, 0)
        spend, held = self._columns(view.n_campaigns)
        today, share = self._calendar(now)
        if today != self.day:  # the day rolled over since the snapshot
            used = np.zeros(rows.size)
        else:
            self._expire_holds(now)
            used = spend[safe] + held[safe]
        p = serve_probabilities(used, view.campaigns.daily_budget_micros[safe], share,
                                self.config.slack, self.config.band)
        return np.where(known & view.campaigns.active[safe], p, 0.0)

    def serve_mask(self, campaign_rows: np.ndarray, seed: int,
                   now: float | None = None) -> np.ndarray:
        """Whether each candidate's campaign paces in for this request (one draw per campaign
        per request, from `seed`)."""
        p = self.probabilities(campaign_rows, now)
        out = p >= 1.0
        partial = np.flatnonzero((p > 0.0) & ~out)
        if partial.size:
            out[partial] = campaign_draws(campaign_rows[partial], seed) < p[partial]
        return out

    def probability(self, campaign_id: int, now: float | None = None) -> float:
        """One campaign's serve probability now (0 for unknown, paused or spent campaigns)."""
        rows = self.catalog.view.campaign_index.rows(np.array([campaign_id], np.int64))
        return float(self.probabilities(rows, now)[0])

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
        """The campaigns that pace in for one request (tools and tests; the request path
        uses `serve_mask` over candidate rows)."""
        ids = np.unique(np.fromiter((int(c) for c in campaign_ids), np.int64))
        rows = self.catalog.view.campaign_index.rows(ids)
        seed = (rng or random).getrandbits(32)
        return set(ids[self.serve_mask(rows, seed, now)].tolist())

    def spend(self, campaign_id: int) -> int:
        """Today's spend as last read (micros; 0 for unknown campaigns)."""
        row = self.catalog.view.campaign_index.get(campaign_id)
        spend, _ = self._columns(self.catalog.view.n_campaigns)
        return int(spend[row]) if row is not None else 0

    # -- in-flight holds -----------------------------------------------------------------------
    def note_served(self, campaign_id: int, expected_micros: float,
                    now: float | None = None) -> None:
        """Hold a served slot's expected click cost until its click has had time to land."""
        now = self._clock() if now is None else now
        row = self.catalog.view.campaign_index.get(campaign_id)
        if row is None:
            return
        self._expire_holds(now)
        _, held = self._columns(row + 1)
        self._holds.append((now + self.config.hold_s, row, expected_micros))
        held[row] += expected_micros

    def _expire_holds(self, now: float) -> None:
        holds, held = self._holds, self._held
        while holds and holds[0][0] <= now:
            _, row, micros = holds.popleft()
            held[row] = max(0.0, held[row] - micros)

    def _calendar(self, now: float) -> tuple[str, float]:
        """(UTC day, share of day gone), memoised per 10 ms: datetime formatting per request
        would cost more than the pacing arithmetic."""
        key = int(now * 100)
        cached = getattr(self, "_calendar_memo", None)
        if cached is None or cached[0] != key:
            cached = (key, utc_day(now), day_share(now))
            self._calendar_memo = cached
        return cached[1], cached[2]

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every `refresh_s` until `stop` is set; a failed refresh keeps the old view."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a store hiccup must not stop pacing
                log.exception("pacing refresh failed; keeping the snapshot from %.0f",
                              self.taken_at)
            try:
                await asyncio.wait_for(stop.wait(), self.config.refresh_s)
            except TimeoutError:
                pass
