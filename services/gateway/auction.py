"""The slot auction: eCPM ranking, a per-scene reserve, and generalized second price per click.

Pure functions, no I/O, so every pricing rule is testable by hand. The request path runs
`auction` over columns (`Bids`), vectorised, and makes objects for the winners only; the
formulas themselves (click value, eCPM) come from `models.pricing`.

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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.pricing import click_value
from models.pricing import ecpm as ecpm_of
from services.common.id_index import first_occurrences

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
        if self.bid_type not in ("cpc", "ocpa"):
            raise ValueError(
                f"ad {self.ad_id}: bid_type must be 'cpc' or 'ocpa' (got {self.bid_type!r})")
        return float(click_value(self.bid_type == "ocpa", self.bid_micros,
                                 self.target_cpa_micros, self.pcvr))

    @property
    def ecpm(self) -> float:
        """Expected revenue per thousand impressions, in micros."""
        return ecpm(self)


def ecpm(candidate: Candidate) -> float:
    """CPC: bid * pCTR * 1000; oCPA: target_cpa * pCTR * pCVR * 1000 (micros per mille)."""
    return float(ecpm_of(candidate.pctr, candidate.click_bid_micros))


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
class Bids:
    """The auction's input as columns (row i is one ranked candidate): what the request path
    builds from the catalog and the ranker's arrays without a Python object per candidate."""

    ad_ids: np.ndarray  # int64
    campaign_ids: np.ndarray  # int64
    ocpa: np.ndarray  # bool
    bid_micros: np.ndarray  # int64 (CPC)
    target_cpa_micros: np.ndarray  # int64 (oCPA)
    pctr: np.ndarray  # float
    pcvr: np.ndarray  # float

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> Bids:
        for c in candidates:
            if c.bid_type not in ("cpc", "ocpa"):
                raise ValueError(
                    f"ad {c.ad_id}: bid_type must be 'cpc' or 'ocpa' (got {c.bid_type!r})")

        def col(name: str, dtype: type) -> np.ndarray:
            return np.fromiter((getattr(c, name) for c in candidates), dtype, len(candidates))

        return cls(col("ad_id", np.int64), col("campaign_id", np.int64),
                   np.fromiter((c.bid_type == "ocpa" for c in candidates), bool,
                               len(candidates)),
                   col("bid_micros", np.int64), col("target_cpa_micros", np.int64),
                   col("pctr", np.float64), col("pcvr", np.float64))

    def candidate(self, i: int) -> Candidate:
        """Row i as a `Candidate` (made for the winners only)."""
        return Candidate(int(self.ad_ids[i]), int(self.campaign_ids[i]),
                         "ocpa" if self.ocpa[i] else "cpc", int(self.bid_micros[i]),
                         int(self.target_cpa_micros[i]), float(self.pctr[i]),
                         float(self.pcvr[i]))


def auction(bids: Bids, slots: int, reserve: Reserve = NO_RESERVE) -> list[Winner]:
    """Fill up to `slots` slots by GSP per click, vectorised; see the module docstring.

    The price-setting "next bidder" of the last winner is the best loser (after the one-ad-per-
    campaign rule: a second ad of a winning campaign could never take the slot, so it cannot set
    the price); with no loser the reserve sets it.
    """
    if slots < 0:
        raise ValueError(f"slots must be >= 0 (got {slots})")
    pctr = np.asarray(bids.pctr, np.float64)
    bid = click_value(bids.ocpa, bids.bid_micros, bids.target_cpa_micros, bids.pcvr)
    value = ecpm_of(pctr, bid)
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = np.maximum(float(reserve.cpc_micros), reserve.ecpm_micros / (1000.0 * pctr))
        min_price = np.maximum(1.0, np.ceil(floor - _ROUND_EPS))
        max_price = np.floor(bid + _ROUND_EPS)
        ok = (np.isfinite(pctr) & (pctr > 0.0) & (value > 0.0) & (value >= reserve.ecpm_micros)
              & (max_price >= min_price))
    live = np.flatnonzero(ok)
    if not live.size or not slots:
        return []
    live = live[np.lexsort((bids.ad_ids[live], -value[live]))]  # best first; ties: lower id
    # one ad per campaign, plus the next one: it sets the last winner's price
    ranked = live[first_occurrences(bids.campaign_ids[live])][:slots + 1]
    winners: list[Winner] = []
    for slot, i in enumerate(ranked[:slots].tolist()):
        next_ecpm = float(value[ranked[slot + 1]]) if slot + 1 < ranked.size else 0.0
        second = math.ceil(next_ecpm / (1000.0 * float(pctr[i])) - _ROUND_EPS)
        price = int(min(max(second, min_price[i]), max_price[i]))
        winners.append(Winner(slot, bids.candidate(i), price, float(value[i]),
                              int(min_price[i])))
    return winners


def run_auction(
    candidates: Sequence[Candidate], slots: int, reserve: Reserve = NO_RESERVE
) -> list[Winner]:
    """`auction` over typed candidates (tests, tools); the request path passes `Bids`."""
    if slots < 0:
        raise ValueError(f"slots must be >= 0 (got {slots})")
    return auction(Bids.of(candidates), slots, reserve)
