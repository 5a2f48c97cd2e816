"""The plain, per-candidate GSP auction: the reference the vectorised `auction` must equal.

Written the obvious way (a loop, a sort, a set of seen campaigns), kept only for tests.
"""

from __future__ import annotations

import math

from services.gateway.auction import Candidate, Reserve, Winner, ecpm

EPS = 1e-6


def reference_auction(candidates: list[Candidate], slots: int, reserve: Reserve) -> list[Winner]:
    bidders = []
    for cand in candidates:
        if not (cand.pctr > 0.0) or not math.isfinite(cand.pctr):
            continue
        value = ecpm(cand)
        if not (value > 0.0) or value < reserve.ecpm_micros:
            continue
        min_price = max(1, math.ceil(reserve.click_floor(cand.pctr) - EPS))
        max_price = math.floor(cand.click_bid_micros + EPS)
        if max_price < min_price:
            continue
        bidders.append((cand, value, min_price, max_price))
    bidders.sort(key=lambda b: (-b[1], b[0].ad_id))
    seen: set[int] = set()
    ranked = []
    for bidder in bidders:
        if bidder[0].campaign_id not in seen:
            seen.add(bidder[0].campaign_id)
            ranked.append(bidder)
    winners = []
    for slot, (cand, value, min_price, max_price) in enumerate(ranked[:slots]):
        next_ecpm = ranked[slot + 1][1] if slot + 1 < len(ranked) else 0.0
        second = math.ceil(next_ecpm / (1000.0 * cand.pctr) - EPS)
        winners.append(Winner(slot, cand, min(max(second, min_price), max_price), value,
                              min_price))
    return winners
