"""GSP-per-click auction: hand-worked prices, then properties over random auctions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.auction import Candidate, Reserve, ecpm, run_auction


def cpc(ad_id: int, campaign_id: int, bid: int, pctr: float) -> Candidate:
    return Candidate(ad_id, campaign_id, "cpc", bid, 0, pctr, 0.1)


def ocpa(ad_id: int, campaign_id: int, target_cpa: int, pctr: float, pcvr: float) -> Candidate:
    return Candidate(ad_id, campaign_id, "ocpa", 0, target_cpa, pctr, pcvr)


def prices(winners) -> list[tuple[int, int]]:
    return [(w.ad_id, w.price_micros) for w in winners]


def test_ecpm_formulas() -> None:
    assert ecpm(cpc(1, 1, 2000, 0.05)) == pytest.approx(100_000)
    # oCPA: target_cpa * pCTR * pCVR * 1000
    assert ecpm(ocpa(2, 2, 50_000, 0.008, 0.1)) == pytest.approx(40_000)


def test_two_bidders_first_pays_second_ecpm_over_own_pctr() -> None:
    a = cpc(1, 10, 2000, 0.05)  # eCPM 100,000
    b = cpc(2, 20, 1000, 0.04)  # eCPM 40,000
    winners = run_auction([b, a], slots=2, reserve=Reserve(ecpm_micros=20_000))
    # A: 40,000 / (1000 * 0.05) = 800 per click; B is last: reserve 20,000 / 40 = 500.
    assert prices(winners) == [(1, 800), (2, 500)]
    assert [w.slot for w in winners] == [0, 1]
    assert winners[0].ecpm == pytest.approx(100_000)


def test_three_bidders_mixed_cpc_and_ocpa() -> None:
    a = cpc(1, 10, 3000, 0.02)  # 60,000
    b = cpc(2, 20, 1000, 0.05)  # 50,000
    c = ocpa(3, 30, 50_000, 0.008, 0.1)  # click bid 5,000; eCPM 40,000
    winners = run_auction([c, b, a], slots=2)
    # A: 50,000 / 20 = 2,500; B: 40,000 / 50 = 800 (C, the best loser, sets B's price).
    assert prices(winners) == [(1, 2500), (2, 800)]
    winners = run_auction([c, b, a], slots=3, reserve=Reserve(ecpm_micros=8_000))
    # C is last: 8,000 / (1000 * 0.008) = 1,000 per click, below its 5,000 click bid.
    assert prices(winners) == [(1, 2500), (2, 800), (3, 1000)]


def test_tie_goes_to_lower_ad_id_and_winner_pays_its_full_bid() -> None:
    a = cpc(7, 10, 1000, 0.05)  # 50,000
    b = cpc(3, 20, 500, 0.10)  # 50,000
    winners = run_auction([a, b], slots=1)
    assert prices(winners) == [(3, 500)]  # tie -> ad 3; next eCPM equals its own -> its bid


def test_one_ad_per_campaign_and_the_duplicate_does_not_set_the_price() -> None:
    a = cpc(1, 10, 2000, 0.05)  # 100,000
    a2 = cpc(2, 10, 1800, 0.05)  # 90,000, same campaign as A
    b = cpc(3, 20, 1000, 0.04)  # 40,000
    winners = run_auction([a, a2, b], slots=3)
    assert [w.ad_id for w in winners] == [1, 3]
    assert winners[0].price_micros == 800  # priced against B, not against its sibling A2


def test_reserve_binding_per_click_and_ads_below_reserve_do_not_run() -> None:
    a = cpc(1, 10, 2000, 0.05)
    b = cpc(2, 20, 1000, 0.04)
    winners = run_auction([a, b], slots=2, reserve=Reserve(cpc_micros=900))
    # A's second price 800 < per-click reserve 900 -> pays 900. B bids 1000 >= 900 -> pays 900.
    assert prices(winners) == [(1, 900), (2, 900)]
    winners = run_auction([a, b], slots=2, reserve=Reserve(ecpm_micros=50_000))
    # B (eCPM 40,000) is below the reserve: A runs alone and pays 50,000 / 50 = 1,000.
    assert prices(winners) == [(1, 1000)]


def test_single_bidder_pays_the_reserve() -> None:
    winners = run_auction([cpc(1, 10, 2000, 0.05)], slots=3, reserve=Reserve(ecpm_micros=30_000))
    assert prices(winners) == [(1, 600)]  # 30,000 / (1000 * 0.05)
    winners = run_auction([cpc(1, 10, 2000, 0.05)], slots=3)
    assert prices(winners) == [(1, 1)]  # no reserve: the one-micro minimum click price


def test_price_never_above_a_fractional_ocpa_click_bid() -> None:
    a = ocpa(1, 10, 25_007, 0.05, 0.1)  # click bid 2,500.7 micros
    b = cpc(2, 20, 2500, 0.05)  # just below A (eCPM 125,000 vs 125,035)
    winners = run_auction([a, b], slots=1)
    # exact second price 2,500 per click; the bid (rounded down) caps at 2,500 as well
    assert prices(winners) == [(1, 2500)]
    c = ocpa(3, 30, 25_009, 0.05, 0.1)  # click bid 2,500.9; next = A at 2,500.7
    winners = run_auction([a, c], slots=1)
    assert winners[0].ad_id == 3
    # ceil(2,500.7) = 2,501 would exceed the bid 2,500.9: the bid wins, rounded down to 2,500
    assert winners[0].price_micros == 2500


def test_ad_that_cannot_pay_the_reserve_in_whole_micros_is_dropped() -> None:
    a = ocpa(1, 10, 10_005, 0.1, 0.1)  # click bid 1,000.5 micros
    winners = run_auction([a], slots=1, reserve=Reserve(ecpm_micros=100_020))  # floor 1,000.2
    assert winners == []  # ceil(floor) 1,001 > floor(bid) 1,000


def test_zero_slots_and_zero_pctr() -> None:
    assert run_auction([cpc(1, 1, 100, 0.1)], slots=0) == []
    assert run_auction([cpc(1, 1, 100, 0.0)], slots=1) == []
    with pytest.raises(ValueError, match="bid_type"):
        run_auction([Candidate(1, 1, "cpm", 100, 0, 0.1, 0.1)], slots=1)


# --- properties -------------------------------------------------------------------------------

candidate_st = st.builds(
    Candidate,
    ad_id=st.integers(1, 10_000),
    campaign_id=st.integers(1, 6),
    bid_type=st.sampled_from(["cpc", "ocpa"]),
    bid_micros=st.integers(1, 5_000_000),
    target_cpa_micros=st.integers(1, 50_000_000),
    pctr=st.floats(1e-4, 0.5),
    pcvr=st.floats(1e-4, 0.5),
)
reserve_st = st.builds(Reserve, ecpm_micros=st.floats(0, 200_000), cpc_micros=st.integers(0, 3000))


def can_pay(c: Candidate, reserve: Reserve) -> bool:
    """Eligible: above the eCPM reserve and able to pay its floor in whole micros."""
    if ecpm(c) < reserve.ecpm_micros or ecpm(c) <= 0:
        return False
    floor = max(1, math.ceil(reserve.click_floor(c.pctr) - 1e-6))
    return math.floor(c.click_bid_micros + 1e-6) >= floor


@settings(max_examples=200, deadline=None)
@given(st.lists(candidate_st, max_size=12, unique_by=lambda c: c.ad_id), st.integers(1, 5),
       reserve_st)
def test_auction_properties(candidates: list[Candidate], slots: int, reserve: Reserve) -> None:
    winners = run_auction(candidates, slots, reserve)
    assert len(winners) <= slots
    assert [w.slot for w in winners] == list(range(len(winners)))
    assert len({w.campaign_id for w in winners}) == len(winners)
    ecpms = [w.ecpm for w in winners]
    assert ecpms == sorted(ecpms, reverse=True)
    won = {w.ad_id for w in winners}
    best_by_campaign: dict[int, float] = {}
    payers = [c for c in candidates if can_pay(c, reserve)]
    for c in payers:
        best_by_campaign[c.campaign_id] = max(best_by_campaign.get(c.campaign_id, 0.0), ecpm(c))
    for i, w in enumerate(winners):
        c = w.candidate
        assert w.price_micros <= c.click_bid_micros + 1e-6  # never above its bid
        assert w.price_micros >= reserve.click_floor(c.pctr) - 1e-6  # never below the reserve
        assert w.price_micros >= max(1, reserve.cpc_micros)
        assert ecpm(c) >= reserve.ecpm_micros
        assert ecpm(c) == pytest.approx(best_by_campaign[c.campaign_id])
        # the next competitor: the next winner, else the best loser of another campaign
        rivals = [ecpm(x) for x in payers if x.ad_id not in won
                  and x.campaign_id not in {v.campaign_id for v in winners}]
        next_ecpm = winners[i + 1].ecpm if i + 1 < len(winners) else max(rivals, default=0.0)
        assert next_ecpm <= w.ecpm + 1e-6
        # keeps its slot at the price (within one micro per click when the bid caps the price)
        paid_ecpm = w.price_micros * c.pctr * 1000
        assert paid_ecpm >= next_ecpm - 1000 * c.pctr - 1e-6
        if w.price_micros < math.floor(c.click_bid_micros + 1e-6):
            assert paid_ecpm >= next_ecpm - 1e-3
        # ...and it is the least such price unless a floor binds
        if w.price_micros > w.floor_micros:
            assert (w.price_micros - 1) * c.pctr * 1000 < next_ecpm + 1e-3
    # no eligible loser of another campaign beats the last winner
    assert len(winners) == min(slots, len(best_by_campaign))
    if winners and len(winners) == slots:
        for c in payers:
            if c.campaign_id not in {w.campaign_id for w in winners}:
                assert ecpm(c) <= winners[-1].ecpm + 1e-6


# --- the vectorised auction equals the plain reference -----------------------------------------

tie_candidate_st = st.builds(
    Candidate,
    ad_id=st.integers(1, 60),
    campaign_id=st.integers(1, 5),
    bid_type=st.sampled_from(["cpc", "ocpa"]),
    bid_micros=st.sampled_from([100, 1000, 2000, 50_000]),  # few values: many exact eCPM ties
    target_cpa_micros=st.sampled_from([1000, 20_000, 1_000_000]),
    pctr=st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.1]),
    pcvr=st.sampled_from([0.01, 0.05, 0.1]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(candidate_st, tie_candidate_st), max_size=40,
                unique_by=lambda c: c.ad_id),
       st.integers(0, 8), reserve_st)
def test_vectorised_auction_equals_the_reference(candidates: list[Candidate], slots: int,
                                                 reserve: Reserve) -> None:
    """Ties, reserves, one ad per campaign, oCPA: the same winners, slots and prices."""
    from tests.auction_reference import reference_auction

    assert run_auction(candidates, slots, reserve) == reference_auction(candidates, slots,
                                                                         reserve)
