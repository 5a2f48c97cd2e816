"""Qscore screening: eligibility rules and the Qscore-eCPM ordering (never raw bid)."""

from __future__ import annotations

import numpy as np
import pytest

from models.nn.qscore import Qscore
from services.common.store import Ad, Campaign, MemoryStore
from services.gateway.catalog import Catalog
from services.gateway.screening import QscoreTable, ScreenPolicy, screen

SCENES = ("home_feed", "search", "product_detail")


def _ad(ad_id: int, campaign: int, bid: int = 100_000, scenes=("home_feed",), status="active",
        bid_type="cpc", cpa: int = 0) -> Ad:
    return Ad(ad_id=ad_id, campaign_id=campaign, advertiser_id=1, category_id=ad_id % 7,
              bid_type=bid_type, bid_micros=bid if bid_type == "cpc" else 0,
              target_cpa_micros=cpa, scenes=scenes, status=status, creative_id=f"c{ad_id}")


def _catalog(ads: list[Ad], paused_campaigns: tuple[int, ...] = (),
             qscores: QscoreTable | None = None) -> Catalog:
    catalog = Catalog(scenes=SCENES, qscore=(qscores or QscoreTable(Qscore(1, 99))).ctr)
    campaigns = {a.campaign_id for a in ads}
    catalog.replace_all(ads, [Campaign(c, 1, 10**9, "paused" if c in paused_campaigns
                                       else "active") for c in campaigns], version=1)
    return catalog


class _PaceOut:
    """A pacer that refuses the given campaigns (the pacing rule itself is test_pacing's)."""

    def __init__(self, catalog: Catalog, refused: set[int]) -> None:
        self.catalog, self.refused = catalog, refused

    def serve_mask(self, campaign_rows: np.ndarray, seed: int) -> np.ndarray:
        ids = self.catalog.view.campaigns.campaign_id[campaign_rows]
        return ~np.isin(ids, np.fromiter(self.refused, np.int64, len(self.refused)))


def _run(catalog: Catalog, candidates, *, caps=None, pacer=None,
         policy=ScreenPolicy(k=2000, freq_cap=3), scene="home_feed"):
    return screen(np.asarray(candidates, np.int64), scene=scene, caps=caps or {},
                  catalog=catalog, pacer=pacer, policy=policy)


def test_each_eligibility_rule_drops_its_ads() -> None:
    ads = [_ad(1, 10), _ad(2, 20, status="paused"), _ad(3, 30), _ad(4, 40, scenes=("search",)),
           _ad(5, 50), _ad(6, 60)]
    catalog = _catalog(ads, paused_campaigns=(30,))
    out = _run(catalog, [1, 2, 3, 4, 5, 6, 999], caps={50: 3, 60: 2},
               pacer=_PaceOut(catalog, {60}))
    assert out.ad_ids.tolist() == [1]
    assert out.dropped == {"unknown": 1, "ad_paused": 1, "scene": 1, "campaign_paused": 1,
                           "paced": 1, "freq_cap": 1}


def test_order_is_by_qscore_estimate_not_raw_bid() -> None:
    # ad 1 bids 5x more but its CTR is 20x worse: ad 2 must come first.
    table = QscoreTable(Qscore(1, 99), {1: (100_000, 100), 2: (100_000, 2_000)})
    catalog = _catalog([_ad(1, 10, bid=500_000), _ad(2, 20, bid=100_000)], qscores=table)
    out = _run(catalog, [1, 2])
    assert out.ad_ids.tolist() == [2, 1]
    assert out.estimate[0] == pytest.approx(1000 * table.ctr(np.array([2]))[0] * 100_000)


def test_ocpa_estimate_uses_prior_cvr_and_k2_cuts() -> None:
    ads = [_ad(1, 10, bid_type="ocpa", cpa=10_000_000), _ad(2, 20, bid=400_000),
           _ad(3, 30, bid=100_000)]
    out = _run(_catalog(ads), [3, 2, 1], policy=ScreenPolicy(k=2, freq_cap=0, prior_cvr=0.05))
    # oCPA click value = 10M x 0.05 = 500k > 400k > 100k; K2 = 2 keeps the best two.
    assert out.ad_ids.tolist() == [1, 2]


@pytest.mark.anyio
async def test_catalog_refresh_sees_admin_writes_in_the_store() -> None:
    store = MemoryStore()
    await store.put_campaigns([Campaign(10, 1, 10**9)])
    await store.put_ads([_ad(1, 10)])
    catalog = Catalog(scenes=SCENES)
    await catalog.load(store)
    await store.upsert_ad(_ad(2, 10, scenes=("search",)))
    await store.set_ad_status(1, "paused")
    assert await catalog.refresh(store) >= 2
    out = _run(catalog, [1, 2], scene="search")
    assert out.ad_ids.tolist() == [2]
    assert _run(catalog, [1, 2]).ad_ids.size == 0  # ad 1 paused, ad 2 only targets search


def test_screening_drops_are_counted_with_a_real_pacer_and_no_slow_path() -> None:
    """Pacing by campaign rows: a spent campaign is dropped as `paced`; a throttled one is in or
    out as a whole (one draw per campaign per request)."""
    from services.gateway.pacing import Pacer

    ads = [_ad(i, 10 + i % 3) for i in range(1, 31)]
    catalog = _catalog(ads)
    pacer = Pacer(MemoryStore(), catalog=catalog, clock=lambda: 1_700_000_000.0)
    spend, _ = pacer._columns(catalog.view.n_campaigns)
    row = catalog.view.campaign_index.get(11)
    spend[row] = 10**9  # campaign 11 spent out
    pacer.day = "20231114"
    out = _run(catalog, list(range(1, 31)), pacer=pacer)
    assert out.dropped == {"paced": 10}
    assert set(out.ad_ids.tolist()) == {i for i in range(1, 31) if 10 + i % 3 != 11}
