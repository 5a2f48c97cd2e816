"""Qscore screening: eligibility rules and the Qscore-eCPM ordering (never raw bid)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.nn.qscore import Qscore
from services.common.store import Ad, Campaign, MemoryStore
from services.gateway.catalog import AD_RECORD, Catalog, take_records
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


# --- the vectorised screening equals a plain, per-candidate reference --------------------------

def reference_screen(candidates: list[int], ads: dict[int, Ad], campaigns: dict[int, Campaign],
                     scene: str, caps: dict[int, int], paced_out: set[int], freq_cap: int,
                     qctr: dict[int, float], k: int, prior_cvr: float):
    """Eligibility and the Qscore-eCPM top K, one candidate at a time."""
    survivors = []
    for ad_id in sorted(set(candidates)):
        ad = ads.get(ad_id)
        if ad is None or ad.status != "active" or scene not in ad.scenes:
            continue
        campaign = campaigns.get(ad.campaign_id)
        if campaign is None or campaign.status != "active" or ad.campaign_id in paced_out:
            continue
        if freq_cap and caps.get(ad.campaign_id, 0) >= freq_cap:
            continue
        value = ad.target_cpa_micros * prior_cvr if ad.bid_type == "ocpa" else ad.bid_micros
        survivors.append((-1000.0 * qctr[ad_id] * value, ad_id))
    return [ad_id for _, ad_id in sorted(survivors)[:k]]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_vectorised_screening_equals_the_reference(data) -> None:
    n_ads = data.draw(st.integers(1, 40))
    campaign_ids = data.draw(st.lists(st.integers(1, 8), min_size=n_ads, max_size=n_ads))
    ads = {}
    for i, campaign in enumerate(campaign_ids, start=1):
        bid_type = data.draw(st.sampled_from(["cpc", "ocpa"]))
        ads[i] = _ad(i, campaign, bid=data.draw(st.sampled_from([1000, 5000, 20_000])),
                     scenes=tuple(data.draw(st.sets(st.sampled_from(SCENES), min_size=1))),
                     status=data.draw(st.sampled_from(["active", "active", "paused"])),
                     bid_type=bid_type, cpa=data.draw(st.sampled_from([10_000, 200_000])))
    campaigns = {c: Campaign(c, 1, 10**9, data.draw(st.sampled_from(["active", "paused"])))
                 for c in set(campaign_ids) if data.draw(st.booleans()) or c % 2}
    counts = {i: (data.draw(st.sampled_from([0, 100, 1000])),
                  data.draw(st.sampled_from([0, 1, 5, 20]))) for i in ads}
    table = QscoreTable(Qscore(1, 99), {i: (m, min(c, m)) for i, (m, c) in counts.items()})
    catalog = Catalog(scenes=SCENES, qscore=table.ctr)
    catalog.replace_all(ads.values(), campaigns.values(), version=1)
    candidates = data.draw(st.lists(st.integers(1, n_ads + 5), max_size=60))
    caps = data.draw(st.dictionaries(st.integers(1, 8), st.integers(0, 4), max_size=4))
    paced_out = data.draw(st.sets(st.integers(1, 8), max_size=3))
    k = data.draw(st.integers(1, 30))
    scene = data.draw(st.sampled_from(SCENES))
    out = screen(np.asarray(candidates, np.int64), scene=scene, caps=caps, catalog=catalog,
                 pacer=_PaceOut(catalog, paced_out), policy=ScreenPolicy(k=k, freq_cap=3))
    qctr = dict(zip(ads, table.ctr(np.asarray(list(ads), np.int64)).tolist(), strict=True))
    assert out.ad_ids.tolist() == reference_screen(candidates, ads, campaigns, scene, caps,
                                                   paced_out, 3, qctr, k, 0.05)
    if len(out.ad_ids) < k:  # nothing was cut by K: every distinct candidate is accounted for
        assert sum(out.dropped.values()) + len(out.ad_ids) == len(set(candidates))


def test_record_take_equals_numpys_structured_index_for_rows_and_masks() -> None:
    rng = np.random.default_rng(3)
    records = np.zeros(1000, AD_RECORD)
    for name in AD_RECORD.names:
        records[name] = rng.integers(0, 2, 1000) if records[name].dtype == bool \
            else rng.integers(-5, 10**6, 1000).astype(records[name].dtype)
    rows = rng.integers(0, 1000, 300)  # repeats and any order
    mask = rng.random(1000) < 0.4
    for index in (rows, mask, rows[:0]):
        taken = take_records(records, index)
        assert taken.dtype == AD_RECORD
        expected = records[index]
        for name in AD_RECORD.names:  # field by field: padding bytes are not data
            assert np.array_equal(taken[name], expected[name]), name
