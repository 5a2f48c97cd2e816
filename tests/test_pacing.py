"""Budget pacing: the throttle rule, the snapshot, and the overspend bound under event lag."""

from __future__ import annotations

import heapq
import random
from datetime import UTC, datetime

import pytest

from services.common.events import Event, EventType, TokenClaims
from services.common.store import Campaign, OnlineStore, utc_day
from services.gateway.pacing import (
    Pacer,
    PacingConfig,
    billable_micros,
    day_share,
    overspend_allowance,
    serve_probability,
)
from services.gateway.worker import EventWorker, WorkerConfig
from tests.test_events_worker import logs_for

NOON = datetime(2025, 6, 15, 12, 0, tzinfo=UTC).timestamp()


def test_day_share_is_utc() -> None:
    assert day_share(datetime(2025, 6, 15, 0, 0, tzinfo=UTC).timestamp()) == 0.0
    assert day_share(NOON) == pytest.approx(0.5)
    assert day_share(datetime(2025, 6, 15, 18, 0, tzinfo=UTC).timestamp()) == pytest.approx(0.75)


@pytest.mark.parametrize(("spend", "share", "expected"), [
    (0, 0.0, 1.0),           # nothing spent at midnight
    (500_000, 0.5, 1.0),     # on schedule
    (520_000, 0.5, 1.0),     # within the 2% slack
    (545_000, 0.5, 0.5),     # 2.5% past slack: half of a 5% band
    (570_000, 0.5, 0.0),     # a full band ahead: off until the clock catches up
    (999_999, 0.9999, 1.0),  # end of day, a micro left
    (1_000_000, 0.9999, 0.0),  # spent: never serves
])
def test_serve_probability_compares_spend_share_with_day_share(spend: int, share: float,
                                                               expected: float) -> None:
    assert serve_probability(spend, 1_000_000, share) == pytest.approx(expected)


def test_zero_budget_never_serves() -> None:
    assert serve_probability(0, 0, 0.5) == 0.0


@pytest.mark.parametrize(("price", "before", "budget", "charged"), [
    (4_000, 0, 10_000, 4_000),
    (4_000, 9_999, 10_000, 4_000),      # under budget: always full price
    (4_000, 12_000, 10_000, 2_000),     # past budget: what is left of the 4k allowance
    (4_000, 14_000, 10_000, 0),
    (100, 1_000_000, 1_000_000, 100),   # 1% of budget (10k) allows more small clicks
    (100, 1_009_950, 1_000_000, 50),
])
def test_billable_micros(price: int, before: int, budget: int, charged: int) -> None:
    assert billable_micros(price, before, budget) == charged
    assert before + charged <= max(before, budget + overspend_allowance(price, budget))


@pytest.mark.anyio
async def test_snapshot_reads_budgets_status_and_todays_spend(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(1, 1, 100_000, "active"),
                               Campaign(2, 1, 100_000, "paused"),
                               Campaign(3, 1, 100_000, "active")])
    day = utc_day(NOON)
    await store.incr_spend(1, day, 40_000)
    await store.incr_spend(3, day, 100_000)
    pacer = Pacer(store)
    await pacer.refresh(now=NOON)
    assert pacer.day == day and pacer.spend(1) == 40_000
    assert pacer.allows(1, NOON, draw=0.999)  # 40% spent at 50% of the day
    assert not pacer.allows(2, NOON, draw=0.0)  # paused
    assert not pacer.allows(3, NOON, draw=0.0)  # spent
    assert not pacer.allows(99, NOON, draw=0.0)  # unknown campaign
    assert pacer.allows(3, NOON + 86_400, draw=0.999)  # a new UTC day resets spend
    # holds: expected cost of served slots counts as spend until the clicks can have landed
    pacer.note_served(1, 30_000, now=NOON)
    assert pacer.probability(1, NOON + 1) == pytest.approx(0.0)  # 70% at 50% of the day
    assert pacer.probability(1, NOON + pacer.config.hold_s + 1) == 1.0
    # an admin write (applied to the catalog pacing reads) is visible at once
    pacer.catalog.apply_campaigns([Campaign(1, 1, 100_000, "paused")])
    assert pacer.probability(1, NOON) == 0.0
    await store.upsert_campaign(Campaign(4, 1, 50_000, "active"))
    await pacer.refresh(now=NOON)
    assert pacer.allows(4, NOON, draw=0.5)  # catalog change picked up at refresh


@pytest.mark.anyio
async def test_throttle_smooths_spend_over_the_day(store: OnlineStore) -> None:
    await store.put_campaigns([Campaign(1, 1, 1_000_000, "active")])
    await store.incr_spend(1, utc_day(NOON), 545_000)
    pacer = Pacer(store)
    await pacer.refresh(now=NOON)
    rng = random.Random(7)
    served = sum(pacer.allows(1, NOON, rng.random()) for _ in range(2000))
    assert 850 < served < 1150  # about half the requests while 4.5% ahead of schedule


@pytest.mark.anyio
async def test_overspend_stays_within_one_click_or_one_percent_under_event_lag(
        store: OnlineStore) -> None:
    """Requests every 0.1 s, clicks arriving 0-4 s late, the worker and the snapshot (1 s)
    lagging: every campaign still ends at or under budget + max(click price, 1% of budget)."""
    rng = random.Random(1234)
    budgets = {1: 100_000, 2: 300_000, 3: 2_000_000}
    prices = {1: (3_000, 9_000), 2: (1_000, 2_000), 3: (5_000, 40_000)}
    await store.put_campaigns([Campaign(c, 1, b, "active") for c, b in budgets.items()])
    events, labels = logs_for(store)
    worker = EventWorker(events, store, labels, WorkerConfig(consumer="w", reclaim_idle_ms=60_000))
    start = datetime(2025, 6, 15, 23, 58, tzinfo=UTC).timestamp()
    pacer = Pacer(store, PacingConfig(refresh_s=1.0, hold_s=4.0))
    await pacer.refresh(now=start)
    inflight: list[tuple[float, int, Event]] = []  # clicks on their way: (due, seq, event)
    max_price = dict.fromkeys(budgets, 0)
    clicked_value = dict.fromkeys(budgets, 0)
    served_after_spent = 0
    seq = 0
    for step in range(600):  # 60 simulated seconds
        now = start + step * 0.1
        if step % 10 == 0:
            await pacer.refresh(now=now)
        for cid in budgets:
            if not pacer.allows(cid, now, rng.random()):
                continue
            if pacer.spend(cid) >= budgets[cid]:
                served_after_spent += 1
            seq += 1
            price = rng.randint(*prices[cid])
            max_price[cid] = max(max_price[cid], price)
            claims = TokenClaims(f"r{seq}", 100 + cid, cid, f"u{seq % 50}", "home_feed",
                                 price, 300 + cid, 0, int(now) + 3600)
            await worker.events.append(Event(f"i{seq}", EventType.IMPRESSION, claims,
                                             int(now * 1000)))
            pacer.note_served(cid, price * 0.6, now)
            if rng.random() < 0.6:
                due = now + rng.uniform(0.0, 4.0)
                heapq.heappush(inflight, (due, seq, Event(f"c{seq}", EventType.CLICK, claims,
                                                          int(due * 1000))))
        while inflight and inflight[0][0] <= now:
            _, _, click = heapq.heappop(inflight)
            clicked_value[click.claims.campaign_id] += click.claims.price_micros
            await worker.events.append(click)
        if step % 5 == 0:  # the worker runs behind the events too
            while await worker.process_batch(500):
                pass
    for _, _, click in inflight:
        clicked_value[click.claims.campaign_id] += click.claims.price_micros
        await worker.events.append(click)
    while await worker.process_batch(500):
        pass
    spend = await store.get_spend(budgets, utc_day(start))
    for cid, budget in budgets.items():
        bound = budget + max(max_price[cid], budget // 100)
        assert spend[cid] <= bound, (cid, spend[cid], bound)
        assert spend[cid] >= budget  # pacing let it deliver its budget before the day ended
        # the lag really did produce clicks past the bound: without the guard this would fail
        assert clicked_value[cid] > bound
    assert served_after_spent == 0  # once the snapshot shows the budget spent, serving stops



@pytest.mark.anyio
async def test_vectorised_eligibility_follows_the_per_campaign_rule(store: OnlineStore) -> None:
    """`eligible` (one request, many campaigns, numpy) agrees with `probability` per campaign,
    after a full refresh and after an incremental one that re-reads only changed spend."""
    import random

    await store.put_campaigns([Campaign(1, 1, 100_000, "active"),
                               Campaign(2, 1, 100_000, "paused"),
                               Campaign(3, 1, 100_000, "active"),
                               Campaign(4, 1, 100_000, "active")])
    day = utc_day(NOON)
    await store.incr_spend(3, day, 100_000)  # spent
    await store.incr_spend(4, day, 54_500)  # half a band ahead of the day: p = 0.5
    pacer = Pacer(store, clock=lambda: NOON)
    await pacer.refresh(now=NOON)
    assert pacer.probability(4, NOON) == pytest.approx(0.5)
    rng = random.Random(5)
    counts = {c: 0 for c in (1, 2, 3, 4, 99)}
    for _ in range(2000):
        for cid in pacer.eligible([1, 2, 3, 4, 99], now=NOON, rng=rng):
            counts[cid] += 1
    assert counts[1] == 2000 and counts[2] == counts[3] == counts[99] == 0
    assert 900 < counts[4] < 1100
    await store.incr_spend(1, day, 100_000)  # campaign 1 spends out: seen incrementally
    await pacer.refresh(now=NOON)
    assert pacer.eligible([1, 4], now=NOON, rng=random.Random(1)) <= {4}
