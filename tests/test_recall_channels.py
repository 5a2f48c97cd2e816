"""Multi-channel recall: each channel fills its quota, duplicates keep the first channel, every
candidate is labelled, and the labels cross the wire (JSON and protobuf) to the gateway's debug
output."""

from __future__ import annotations

import numpy as np
import pytest

from services.common import wire
from services.retrieval.index import build_index
from services.retrieval.recall import (
    CHANNEL_CATEGORY,
    CHANNEL_NEW,
    CHANNEL_VALUE,
    CHANNEL_VECTOR,
    AdCatalog,
    ChannelQuotas,
    Recall,
    RecallQuery,
    channel_query,
    recent_categories,
)

N, DIM, CATEGORIES = 3000, 16, 30
SCENE = "home_feed"


@pytest.fixture()
def world() -> tuple[Recall, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(N, DIM)).astype(np.float32)
    ad_ids = np.arange(100, 100 + N, dtype=np.int64)
    category = 1 + (np.arange(N) % CATEGORIES)
    value = rng.lognormal(size=N).astype(np.float32)
    index, _ = build_index(vectors, ad_ids)
    catalog = AdCatalog.build(ad_ids, [[SCENE]] * N, ["active"] * N, value)
    recall = Recall(index, catalog)
    recall.set_categories(ad_ids, category)
    return recall, vectors, ad_ids, category, value


def _names(result) -> np.ndarray:
    return result.channel_names()


def test_each_channel_fills_its_quota_and_is_labelled(world) -> None:
    recall, vectors, ad_ids, category, value = world
    quotas = ChannelQuotas(category=0.25, high_value=0.15, new=0.0)
    user_cats = np.array([7, 3])
    result = recall.recall(RecallQuery(scene=SCENE, user_vector=vectors[0], k=400,
                                       categories=user_cats, quotas=quotas))
    names = _names(result)
    assert result.ad_ids.size == 400 and np.unique(result.ad_ids).size == 400
    counts = {c: int((names == c).sum()) for c in set(names.tolist())}
    ann_head = 400 - 100 - 60
    # the two-tower gets its head plus whatever later channels duplicated (refilled from its
    # tail); each other channel gets its quota minus what an earlier channel already brought
    assert counts[CHANNEL_VECTOR] >= ann_head
    assert counts[CHANNEL_VECTOR] + counts[CHANNEL_CATEGORY] + counts[CHANNEL_VALUE] == 400
    rows = result.ad_ids - 100
    cat_rows = rows[names == CHANNEL_CATEGORY]
    assert np.isin(category[cat_rows], user_cats).all()
    # the category channel's ads are the best by value within the user's categories, minus
    # those the ANN head already holds
    in_cats = np.flatnonzero(np.isin(category, user_cats))
    best = set(in_cats[np.argsort(-value[in_cats])][:100].tolist())
    head = set(rows[:ann_head].tolist())
    assert set(cat_rows.tolist()) == best - head
    val_rows = rows[names == CHANNEL_VALUE]
    top_value = set(np.argsort(-value)[:60].tolist())
    assert set(val_rows.tolist()) == top_value - head - best
    # first channel wins: an ANN-head ad is never relabelled by a later channel
    assert (names[:ann_head] == CHANNEL_VECTOR).all()


def test_disjoint_channels_get_exact_quotas_and_new_ads_get_theirs(world) -> None:
    recall, vectors, ad_ids, category, value = world
    # a user vector pointing away from the value leaders, categories the ANN rarely returns
    for i in range(5):
        recall.add_ad(10_000 + i, vectors[i] * 0.0 + 1e-3, [SCENE], "active",
                      cold_score=float(i + 1))
    quotas = ChannelQuotas(category=0.1, high_value=0.1, new=0.01)
    result = recall.recall(RecallQuery(scene=SCENE, user_vector=-vectors[1], k=500,
                                       categories=np.array([11]), quotas=quotas))
    names = _names(result)
    assert int((names == CHANNEL_NEW).sum()) == 5  # quota 5, exactly the five new ads
    assert set(result.ad_ids[names == CHANNEL_NEW].tolist()) == {10_000 + i for i in range(5)}
    assert result.ad_ids.size == 500 and np.unique(result.ad_ids).size == 500


def test_channels_respect_eligibility_and_fall_back_to_the_ann(world) -> None:
    recall, vectors, ad_ids, category, value = world
    best_value = ad_ids[np.argsort(-value)[:10]]
    result = recall.recall(RecallQuery(scene=SCENE, user_vector=vectors[2], k=200,
                                       exclude_ad_ids=best_value, categories=np.array([5]),
                                       quotas=ChannelQuotas(category=0.5, high_value=0.4)))
    assert not np.isin(best_value, result.ad_ids).any()
    # no categories: the category share goes back to the two-tower
    plain = recall.recall(RecallQuery(scene=SCENE, user_vector=vectors[2], k=200,
                                      quotas=ChannelQuotas(category=0.5, high_value=0.0, new=0.0)))
    assert (_names(plain) == CHANNEL_VECTOR).all() and plain.ad_ids.size == 200


def test_recent_categories_and_quota_parsing() -> None:
    hist = {"hist_category_id": wire.Column(ints=np.array([4, 4, 9, 0, 2, 9, 5], np.int64))}
    assert recent_categories(hist, 3).tolist() == [4, 9, 2]
    assert recent_categories({}, 3).size == 0
    fields = channel_query(hist, {"category": 0.3, "recent_categories": 2})
    assert fields["quotas"] == ChannelQuotas(category=0.3, recent_categories=2)
    assert fields["categories"].tolist() == [4, 9]
    with pytest.raises(ValueError, match="unknown channels"):
        ChannelQuotas.from_dict({"bogus": 0.1})
    with pytest.raises(ValueError, match="at most 1"):
        ChannelQuotas(category=0.7, high_value=0.5)


def test_channel_labels_cross_the_wire_in_json_and_protobuf(world) -> None:
    recall, vectors, *_ = world
    result = recall.recall(RecallQuery(scene=SCENE, user_vector=vectors[0], k=100,
                                       categories=np.array([1]),
                                       quotas=ChannelQuotas(category=0.2, high_value=0.1)))
    response = wire.RecallResponse(ad_ids=result.ad_ids, scores=result.scores,
                                   channel=result.channel, eligible=result.eligible,
                                   **result.wire_channels())
    expected = result.channel_names().tolist()
    for media in (wire.JSON, wire.PROTOBUF):
        back = wire.decode(wire.RecallResponse, wire.encode(response, media), media)
        assert back.candidate_channels() == expected
    old_style = wire.RecallResponse(ad_ids=result.ad_ids, scores=result.scores,
                                    channel="cold_start")
    assert old_style.candidate_channels() == ["cold_start"] * 100


@pytest.mark.parametrize("seed", range(8))
def test_the_category_channel_is_the_top_eligible_ads_of_the_users_categories(seed: int) -> None:
    """Against a plain reference: per category its best 2n ads by eCPM among those active
    and targeting the scene (the cached lists), less the request's exclusions, best n by
    (eCPM, lower id). Scores tie often (few distinct values), and the exclusions fall among
    the best ads, where the cut is made, sometimes leaving fewer than n."""
    rng = np.random.default_rng(seed)
    n_ads = 2000
    ad_ids = rng.permutation(np.arange(10, 10 + n_ads, dtype=np.int64))
    scenes = [[SCENE] if rng.random() < 0.9 else ["search"] for _ in range(n_ads)]
    status = ["active" if rng.random() < 0.95 else "paused" for _ in range(n_ads)]
    value = rng.integers(1, 12, n_ads).astype(np.float32)  # ties
    category = rng.integers(1, 9, n_ads)
    vectors = rng.normal(size=(n_ads, DIM)).astype(np.float32)
    index, _ = build_index(vectors, ad_ids)
    recall = Recall(index, AdCatalog.build(ad_ids, scenes, status, value))
    recall.set_categories(ad_ids, category)
    k = int(rng.integers(20, 400))
    quotas = ChannelQuotas(category=1.0, high_value=0.0, new=0.0)
    user_cats = rng.choice(np.arange(1, 9), size=int(rng.integers(1, 5)), replace=False)
    share = rng.choice([0.0, 0.3, 0.9])
    best = np.argsort(-value)[:n_ads // 2]
    excluded = ad_ids[best[rng.random(best.size) < share]]
    n = int(k * quotas.category)
    listed = np.array([SCENE in s for s in scenes]) & (np.asarray(status) == "active")
    expected_rows = []
    for cat in user_cats:
        rows = np.flatnonzero(listed & (category == cat))
        rows = rows[np.lexsort((ad_ids[rows], -value[rows]))][:2 * n]
        expected_rows += rows[~np.isin(ad_ids[rows], excluded)].tolist()
    rows = np.asarray(expected_rows, dtype=np.int64)
    expected = ad_ids[rows[np.lexsort((ad_ids[rows], -value[rows]))][:n]]
    result = recall.recall(RecallQuery(scene=SCENE, user_vector=vectors[0], k=k,
                                       categories=user_cats, quotas=quotas,
                                       exclude_ad_ids=excluded))
    got = result.ad_ids[_names(result) == CHANNEL_CATEGORY]
    assert np.array_equal(got, expected)


def test_an_ad_paused_after_the_category_lists_were_cached_is_not_recalled(world) -> None:
    """The lists are cached per scene; a request that still holds them when an ad is paused
    (the status column changes in place) must not return it: the picked rows are re-checked,
    and the deeper screened path replaces them."""
    recall, vectors, _, _, _ = world
    quotas = ChannelQuotas(category=1.0, high_value=0.0, new=0.0)
    query = RecallQuery(scene=SCENE, user_vector=vectors[0], k=100,
                        categories=np.array([1, 2, 3]), quotas=quotas)
    before = recall.recall(query).ad_ids
    paused = before[:5]
    catalog = recall._catalog
    catalog.active[catalog.ids.rows(paused)] = False  # as set_status does, the cache kept
    after = recall.recall(query).ad_ids
    assert after.size == 100 and not np.isin(paused, after).any()
    assert np.array_equal(after[:95], before[5:])


def test_value_of_reads_each_ads_cold_start_estimate_by_id(world) -> None:
    recall, _, ad_ids, _, value = world
    picked = np.array([ad_ids[5], 10**9, ad_ids[0]])
    assert np.allclose(recall.value_of(picked), [value[5], 0.0, value[0]])
