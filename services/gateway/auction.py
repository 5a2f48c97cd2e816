"""The slot auction: eCPM ranking, a per-scene reserve, and generalized second price per click.

Pure functions over typed candidates, no I/O, so every pricing rule is testable by hand.

Billing is per click for CPC and oCPA alike. A candidate's *click bid* is what it offers per click:
CPC: `bid_micros`; oCPA: `target_cpa_micros * pcvr` (the platform bids on the advertiser's behalf
so that, at the predicted CVR, the cost per conversion meets the target). Its eCPM is
`click_bid * pctr * 1000` (micros per thousand impressions), which for oCPA is the documented
`target_cpa * pctr * pcvr * 1000`.

Reserve semantics (decided here): a scene's reserve is an **eCPM floor** (`Reserve.ecpm_micros`,
micros per mille), optionally with a **per-click floor** (`Reserve.cpc_micros`). An eCPM floor is
what a publisher cares about (revenue per impression), and it treats a high-bid/low-pCTR ad and a
low-bid/high-pCTR ad alike. In GSP it acts as a phantom bidder ranked last: ad i's price floor per
click is `max(cpc_micros, ecpm_micros / (1000 * pctr_i))`, and an ad below the reserve does not
run.

Pricing (GSP per click): candidates are sorted by eCPM (ties: lower ad id first, so results are
deterministic), only the best ad of each campaign stays, ads below the reserve are dropped, and
the top `slots` win. Winner i pays `ecpm_{i+1} / (1000 * pctr_i)` per click -- the least click
price at which its eCPM still reaches the next ad's -- clamped into `[floor_i, click_bid_i]`.

Integer micros: the second price is rounded UP (so the winner still outranks the ad below at the
price it pays) and the click bid is rounded DOWN (so the price never exceeds the bid). When the two
meet inside one micro, the bid wins: the price is then at most one micro below the exact second
price. An ad that cannot pay its floor in whole micros (`floor(click_bid) < ceil(floor_i)`) is
ineligible, and every click costs at least 1 micro, so `floor <= price <= bid` always holds
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Floating noise in ecpm/pctr round trips (e.g. 100.00000000001) must not cost a whole micro.
_ROUND_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ranked ad entering the auction (scores from DIN/ESMM, bids from the catalog)."""

    ad_id: int
    campaign_id: int
    bid_type: str  # 'cpc' | 'ocpa'
    bid_micros: int  # CPC max bid per click; 0 for oCPA
    target_cpa_micros: int  # oCPA target cost per conversion; 0 for CPC
    pctr: float
    pcvr: float

    @property
    def click_bid_micros(self) -> float:
        """What this ad offers per click (oCPA: the platform's bid target_cpa * pCVR)."""
        if self.bid_type == "ocpa":
            return self.target_cpa_micros * self.pcvr
        if self.bid_type == "cpc":
            return float(self.bid_micros)
        raise ValueError(
            f"ad {self.ad_id}: bid_type must be 'cpc' or 'ocpa' (got {self.bid_type!r})")

    @property
    def ecpm(self) -> float:
        """Expected revenue per thousand impressions, in micros."""
        return ecpm(self)


def ecpm(candidate: Candidate) -> float:
    """CPC: bid * pCTR * 1000; oCPA: target_cpa * pCTR * pCVR * 1000 (micros per mille)."""
    return candidate.click_bid_micros * candidate.pctr * 1000.0


@dataclass(frozen=True, slots=True)
class Reserve:
    """A scene's reserve: an eCPM floor (micros per mille) and an optional per-click floor."""

    ecpm_micros: float = 0.0
    cpc_micros: int = 0

    def __post_init__(self) -> None:
        if self.ecpm_micros < 0 or self.cpc_micros < 0:
            raise ValueError("reserve must be >= 0")

    def click_floor(self, pctr: float) -> float:
        """The least an ad with this pCTR may pay per click (exact, before rounding)."""
        return max(float(self.cpc_micros), self.ecpm_micros / (1000.0 * pctr))


NO_RESERVE = Reserve()


@dataclass(frozen=True, slots=True)
class Winner:
    """One won slot: the ad, its 0-based slot, what it pays per click, and its eCPM."""

    slot: int
    candidate: Candidate
    price_micros: int
    ecpm: float
    floor_micros: int  # the reserve per click this ad faced (rounded up)

    @property
    def ad_id(self) -> int:
        return self.candidate.ad_id

    @property
    def campaign_id(self) -> int:
        return self.candidate.campaign_id


@dataclass(frozen=True, slots=True)
class _Bidder:
    candidate: Candidate
    ecpm: float
    min_price: int  # ceil(floor per click), at least 1 micro
    max_price: int  # floor(click bid)


def _eligible(candidates: Iterable[Candidate], reserve: Reserve) -> list[_Bidder]:
    """Bidders that can pay the reserve in whole micros, best eCPM first, one per campaign."""
    bidders: list[_Bidder] = []
    for cand in candidates:
        if not (cand.pctr > 0.0) or not math.isfinite(cand.pctr):
            continue
        value = ecpm(cand)
        if not (value > 0.0) or value < reserve.ecpm_micros:
            continue
        min_price = max(1, math.ceil(reserve.click_floor(cand.pctr) - _ROUND_EPS))
        max_price = math.floor(cand.click_bid_micros + _ROUND_EPS)
        if max_price < min_price:
            continue
        bidders.append(_Bidder(cand, value, min_price, max_price))
    bidders.sort(key=lambda b: (-b.ecpm, b.candidate.ad_id))
    seen: set[int] = set()
    unique: list[_Bidder] = []
    for bidder in bidders:
        if bidder.candidate.campaign_id in seen:
            continue
        seen.add(bidder.candidate.campaign_id)
        unique.append(bidder)
    return unique


def run_auction(
    candidates: Sequence[Candidate], slots: int, reserve: Reserve = NO_RESERVE
) -> list[Winner]:
    """Fill up to `slots` slots by GSP per click; see the module docstring for every rule.

    The price-setting "next bidder" of the last winner is the best loser (after the one-ad-per-
    campaign rule: a second ad of a winning campaign could never take the slot, so it cannot set
    the price); with no loser the reserve sets it.
    """
    if slots < 0:
        raise ValueError(f"slots must be >= 0 (got {slots})")
    ranked = _eligible(candidates, reserve)
    winners: list[Winner] = []
    for slot, bidder in enumerate(ranked[:slots]):
        pctr = bidder.candidate.pctr
        next_ecpm = ranked[slot + 1].ecpm if slot + 1 < len(ranked) else 0.0
        second = math.ceil(next_ecpm / (1000.0 * pctr) - _ROUND_EPS)
        price = min(max(second, bidder.min_price), bidder.max_price)
        winners.append(Winner(slot, bidder.candidate, price, bidder.ecpm, bidder.min_price))
    return winners
