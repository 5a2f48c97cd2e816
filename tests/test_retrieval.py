"""Recall: eligible ads only, K met, cold users served, live catalog updates."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from services.retrieval.index import build_index, build_value_index, normalize
from services.retrieval.recall import (
    PROBE_DEPTH,
    AdCatalog,
    ChannelQuotas,
    Recall,
    RecallQuery,
    UnknownAdError,
    fetch_for,
    probe_depth,
)
from tests.test_retrieval_index import clustered_corpus

SCENES = ("home_feed", "search", "product_detail")
# These tests check the two-tower ANN channel alone (tests/test_recall_channels.py: the rest).
ANN_ONLY = ChannelQuotas(category=0.0, high_value=0.0, new=0.0)


@pytest.mark.parametrize("share", [0.3, 0.92, 0.999, 1.0])
def test_fetch_holds_k_eligible_under_random_eligibility_with_less_than_a_flat_margin(share):
    """The binomial slack of `fetch_for`: K eligible among the fetched results in all but a
    few of 20,000 draws, asking for less than the flat 1.25 x K / share it replaced; the
    lists searched (`probe_depth`) scale with K / share x PROBE_DEPTH."""
    total, k = 1_000_000, 2000
    eligible = int(share * total)
    fetch = fetch_for(k, total, eligible)
    draws = np.random.default_rng(0).binomial(fetch, eligible / total, 20_000)
    assert (draws >= k).mean() > 0.999
    assert fetch < 1.25 * k * total / eligible
    assert probe_depth(k, total, eligible) == \
        int(np.ceil(PROBE_DEPTH * k * total / eligible)) + 16
    assert fetch_for(k, 1500, 1500) == 1500  # never more than the catalog


def make_recall(n: int = 6000, exact_below: int = 1000, seed: int = 0):
    """IVF index (forced by the low threshold); a third of ads paused, scenes vary per ad."""
    vectors, ad_ids, queries = clustered_corpus(n=n, seed=seed)
    index, spec = build_index(vectors, ad_ids, exact_below=exact_below, queries=queries, k=500)
    rng = np.random.default_rng(seed)
    scenes = [[s for s in SCENES if rng.random() < 0.5] for _ in range(n)]
    statuses = ["paused" if rng.random() < 0.3 else "active" for _ in range(n)]
    cold = rng.random(n).astype(np.float32)
    catalog = AdCatalog.build(ad_ids, scenes, statuses, cold)
    truth = {"scenes": dict(zip(ad_ids.tolist(), scenes, strict=True)),
             "status": dict(zip(ad_ids.tolist(), statuses, strict=True)),
             "cold": dict(zip(ad_ids.tolist(), cold.tolist(), strict=True))}
    return (Recall(index, catalog, tuned_k=spec.k, quotas=ANN_ONLY), vectors, ad_ids, queries,
            truth)


@pytest.fixture(scope="module")
def world():
    return make_recall()


def eligible_ids(truth, scene):
    return {a for a, s in truth["scenes"].items()
            if scene in s and truth["status"][a] == "active"}


def test_only_eligible_ads_and_k_met(world):
    recall, _, _, queries, truth = world
    for scene in SCENES:
        allowed = eligible_ids(truth, scene)
        for q in queries[:10]:
            result = recall.recall(RecallQuery(scene=scene, user_vector=q, k=1000))
            got = result.ad_ids.tolist()
            assert len(got) == 1000 and len(set(got)) == 1000
            assert set(got) <= allowed
            assert result.eligible == len(allowed)
            assert np.all(np.diff(result.scores) <= 1e-6)  # best first


def test_results_match_exact_search_over_eligible_ads(world):
    recall, vectors, ad_ids, queries, truth = world
    allowed = np.array(sorted(eligible_ids(truth, "search")))
    rows = np.searchsorted(ad_ids, allowed, sorter=np.argsort(ad_ids))
    rows = np.argsort(ad_ids)[rows]
    hits = 0
    for q in queries[:20]:
        exact = allowed[np.argsort(-(normalize(vectors[rows]) @ q))[:300]]
        got = recall.recall(RecallQuery(scene="search", user_vector=q, k=300)).ad_ids
        hits += len(set(exact.tolist()) & set(got.tolist()))
    assert hits / (20 * 300) >= 0.95


def test_k_larger_than_corpus_returns_every_eligible_ad_and_no_padding(world):
    recall, _, _, queries, truth = world
    allowed = eligible_ids(truth, "home_feed")
    result = recall.recall(RecallQuery(scene="home_feed", user_vector=queries[0], k=50_000))
    assert set(result.ad_ids.tolist()) == allowed
    assert (result.ad_ids >= 0).all() and result.ad_ids.dtype == np.int64


def test_cold_user_gets_cold_start_channel_in_score_order(world):
    recall, _, _, _, truth = world
    result = recall.recall(RecallQuery(scene="product_detail", user_vector=None, k=50))
    assert result.channel == "cold_start"
    allowed = eligible_ids(truth, "product_detail")
    expected = sorted(allowed, key=lambda a: (-truth["cold"][a], a))[:50]
    assert result.ad_ids.tolist() == expected


def test_unknown_scene_and_exclusions(world):
    recall, _, _, queries, truth = world
    assert recall.recall(RecallQuery(scene="nowhere", user_vector=queries[0])).ad_ids.size == 0
    first = recall.recall(RecallQuery(scene="search", user_vector=queries[0], k=100)).ad_ids
    excluded = first[:40]
    again = recall.recall(RecallQuery(scene="search", user_vector=queries[0], k=100,
                                      exclude_ad_ids=excluded)).ad_ids
    assert len(again) == 100 and not set(excluded.tolist()) & set(again.tolist())
    loose = recall.recall(RecallQuery(scene="search", user_vector=queries[0], k=3000,
                                      include_paused=True, ignore_scene_targeting=True))
    assert any(truth["status"][a] == "paused" for a in loose.ad_ids.tolist())


def test_eligible_mask_agrees_with_the_catalog_and_unknown_ids_are_not_eligible(world):
    recall, _, ad_ids, _, truth = world
    ids = np.concatenate([ad_ids[:500], [-7, 10**12]])
    excluded = ad_ids[:3]
    for scene in SCENES:
        mask = recall.eligible(ids, RecallQuery(scene=scene, exclude_ad_ids=excluded))
        allowed = eligible_ids(truth, scene) - set(excluded.tolist())
        assert mask.tolist() == [a in allowed for a in ids.tolist()]
    loose = recall.eligible(ids, RecallQuery(scene="search", include_paused=True,
                                             ignore_scene_targeting=True))
    assert loose.tolist() == [True] * 500 + [False, False]


def test_wrong_vector_size_is_a_value_error(world):
    with pytest.raises(ValueError, match="dims"):
        world[0].recall(RecallQuery(scene="search", user_vector=np.ones(5)))


def test_new_ad_is_retrievable_and_pause_removes_it():
    recall, _, _, queries, _ = make_recall(n=3000)
    query = queries[3]
    new_id = 10**9 + 7  # far outside the bundle's id range
    recall.add_ad(new_id, query * 5, ["search"], "active")  # the best possible match
    result = recall.recall(RecallQuery(scene="search", user_vector=query, k=20))
    assert result.ad_ids[0] == new_id
    assert new_id not in recall.recall(
        RecallQuery(scene="home_feed", user_vector=query, k=20)).ad_ids
    recall.set_status(new_id, "paused")
    assert new_id not in recall.recall(
        RecallQuery(scene="search", user_vector=query, k=20)).ad_ids
    recall.set_status(new_id, "active")
    assert recall.recall(RecallQuery(scene="search", user_vector=query, k=20)).ad_ids[0] == new_id
    # cold users see it once its cold-start score is the best
    recall.set_cold_start_scores({new_id: 1e9})
    assert recall.recall(RecallQuery(scene="search", k=5)).ad_ids[0] == new_id
    with pytest.raises(UnknownAdError):
        recall.set_status(123456789012, "paused")
    with pytest.raises(ValueError, match="vector is required"):
        recall.add_ad(10**9 + 8, None, ["search"])


def test_pausing_a_bundle_ad_and_re_targeting_it():
    recall, _, _, queries, _ = make_recall(n=3000)
    top = int(recall.recall(RecallQuery(scene="search", user_vector=queries[1], k=1)).ad_ids[0])
    recall.set_status(top, "paused")
    assert top not in recall.recall(
        RecallQuery(scene="search", user_vector=queries[1], k=200)).ad_ids
    recall.add_ad(top, None, ["home_feed"], "active")  # known ad: new scenes, same vector
    assert recall.status_of(top) == "active"
    assert top not in recall.recall(
        RecallQuery(scene="search", user_vector=queries[1], k=200)).ad_ids
    assert top in recall.recall(
        RecallQuery(scene="home_feed", user_vector=queries[1], k=200)).ad_ids


def test_searches_stay_correct_while_ads_are_added():
    recall, _, _, queries, truth = make_recall(n=3000)
    errors: list[str] = []
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            result = recall.recall(RecallQuery(scene="search", user_vector=queries[2], k=100))
            if (result.ad_ids < 0).any() or len(set(result.ad_ids.tolist())) != 100:
                errors.append("bad result")

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(1)
    for i in range(100):
        recall.add_ad(5_000_000 + i, rng.standard_normal(32), ["search"])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert recall.size == 3100


# ---- value-aware recall: cos(u, a) + w·(log v_a − mu) -----------------------------------------

W = 0.05


def make_value_recall(n: int = 400, dim: int = 16, seed: int = 0):
    """A flat value-aware index over random unit ads, every ad in scene "search"; ad 0 and ad
    1 share one vector (equal cosine for any query), ad 2 is nearly orthogonal to the query."""
    rng = np.random.default_rng(seed)
    query = normalize(rng.standard_normal((1, dim)))[0]
    vectors = normalize(rng.standard_normal((n, dim)))
    vectors[1] = vectors[0]
    vectors[2] = normalize((0.05 * query + normalize(rng.standard_normal((1, dim)))[0])[None])[0]
    ad_ids = np.arange(n, dtype=np.int64) + 100
    ecpm = rng.lognormal(8.0, 0.5, n)
    ecpm[0], ecpm[1], ecpm[2] = 1_000.0, 4_000.0, 1e9
    index, spec = build_value_index(vectors, ad_ids, ecpm=ecpm, value_weight=W)
    catalog = AdCatalog.build(ad_ids, [["search"]] * n, ["active"] * n, ecpm)
    return (Recall(index, catalog, tuned_k=spec.k, value=spec.value, quotas=ANN_ONLY), vectors,
            ad_ids, ecpm, query)


def test_value_recall_prefers_the_higher_value_of_two_equally_similar_ads():
    recall, vectors, ad_ids, ecpm, _ = make_value_recall()
    result = recall.recall(RecallQuery(scene="search", user_vector=vectors[0] * 3.0, k=2))
    assert result.ad_ids.tolist() == [101, 100]  # same cosine (1.0), 4x the value first
    mu = np.log(ecpm).mean()
    assert result.scores == pytest.approx(1.0 + W * (np.log([4_000.0, 1_000.0]) - mu), abs=1e-5)


def test_a_very_valuable_ad_enters_the_top_k_that_cosine_alone_misses():
    recall, vectors, ad_ids, ecpm, query = make_value_recall()
    k = 20
    by_cosine = ad_ids[np.argsort(-(vectors @ query))[:k]]
    assert 102 not in by_cosine
    got = recall.recall(RecallQuery(scene="search", user_vector=query, k=k)).ad_ids
    assert 102 in got
    want = vectors @ query + W * (np.log(ecpm) - np.log(ecpm).mean())
    assert got.tolist() == ad_ids[np.argsort(-want)[:k]].tolist()
    with pytest.raises(ValueError, match="dims"):  # callers pass plain vectors, not augmented
        recall.recall(RecallQuery(scene="search", user_vector=np.ones(17)))


def test_new_ad_is_augmented_with_its_cold_score():
    recall, _, _, ecpm, query = make_value_recall()
    term = recall.value
    assert recall.dim == 16 and term.floor == pytest.approx(ecpm.min())
    recall.add_ad(9_000, query * 2.0, ["search"], "active", cold_score=50_000.0)
    recall.add_ad(9_001, -query, ["search"], "active", cold_score=0.0)  # no estimate
    stored = recall._fresh.reconstruct(9_000)
    assert np.allclose(stored[:16], query, atol=1e-6)
    assert stored[16] == pytest.approx(W * (np.log(50_000.0) - term.mu), abs=1e-6)
    assert recall._fresh.reconstruct(9_001)[16] == pytest.approx(
        W * (np.log(ecpm.min()) - term.mu), abs=1e-6)
    result = recall.recall(RecallQuery(scene="search", user_vector=query, k=5))
    assert result.ad_ids[0] == 9_000
    assert result.scores[0] == pytest.approx(1.0 + stored[16], abs=1e-5)
