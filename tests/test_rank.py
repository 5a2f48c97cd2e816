"""DIN+ESMM ranking: decomposed == undecomposed, catalog and request features, batching."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from models.bundle import read_bundle
from services.common import wire
from services.rank.batcher import BatchSettings, MicroBatcher
from services.rank.ranker import Ranker, RankQuery, expanded_batch
from services.rank.state import run_batch

USER = {"age_bucket": 4, "gender": "female", "city_tier": 3}
CONTEXT = {"hour": 9, "device": "ios"}


def hist(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"hist_ad_id": wire.Column(ints=rng.integers(0, 5000, n).tolist()),
            "hist_category_id": wire.Column(ints=rng.integers(0, 300, n).tolist())}


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return read_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def ranker(bundle):
    return Ranker.from_bundle(bundle, device="cpu")


@pytest.fixture(scope="module")
def ad_ids(bundle):
    return pq.read_table(bundle.file("catalog.parquet"), columns=["ad_id"]).column(
        "ad_id").to_numpy()


def test_decomposed_equals_the_undecomposed_network(ranker, ad_ids):
    history = hist(30)
    history["hist_ad_id"] = wire.Column(ints=history["hist_ad_id"].ints.tolist() + [-1] * 5)
    prepared = ranker.prepare(RankQuery(ad_ids[:200], "search", USER, history, CONTEXT))
    fast = ranker.score(prepared)
    with torch.inference_mode():
        full = ranker.model(expanded_batch([prepared]))  # forward on [N] x [N, L]
    for key in ("pctr", "pcvr", "pctcvr"):
        np.testing.assert_allclose(getattr(fast, key), full[key].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast.pctcvr, fast.pctr * fast.pcvr, rtol=1e-5)
    assert fast.ad_ids.tolist() == ad_ids[:200].tolist()


def test_catalog_features_come_from_the_bundle(ranker, bundle, ad_ids):
    table = pq.read_table(bundle.file("catalog.parquet")).to_pydict()
    picked = ad_ids[[3, 10, 42]]
    prepared = ranker.prepare(RankQuery(picked, "search", USER, hist(5), CONTEXT))
    for name in ranker.encoder.ad_names:
        raw = [table[name][i] for i in (3, 10, 42)]
        want = ranker.encoder.ads({name: raw}, 3)[name]
        assert prepared.candidates[name].tolist() == want.tolist(), name


def test_unknown_ids_are_dropped_unless_the_request_describes_them(ranker, ad_ids):
    new = np.array([10**13, int(ad_ids[0])], dtype=np.int64)
    scored = ranker.rank(RankQuery(new, "search", USER, hist(5), CONTEXT))
    assert scored.ad_ids.tolist() == [int(ad_ids[0])] and scored.unknown == 1
    features = {"campaign_id": wire.Column(ints=[7, 7]),
                "bid_type": wire.Column(strs=["ocpa", "cpc"])}
    described = ranker.rank(RankQuery(new, "search", USER, hist(5), CONTEXT, features))
    assert described.ad_ids.tolist() == new.tolist() and described.unknown == 0
    assert np.isfinite(described.pctr).all()


def test_a_catalog_update_makes_a_new_ad_rankable(bundle, ad_ids):
    ranker = Ranker.from_bundle(bundle, device="cpu")
    new_id = int(ad_ids.max()) + 5
    assert ranker.add_ad(new_id, {"campaign_id": 3, "category_id": 4, "bid_type": "cpc"})
    scored = ranker.rank(RankQuery(np.array([new_id]), "home_feed", USER, hist(3), CONTEXT))
    assert scored.ad_ids.tolist() == [new_id] and 0 < scored.pctr[0] < 1


def test_history_longer_than_the_sequence_keeps_the_newest(ranker, ad_ids):
    long = hist(80, seed=3)
    cut = {k: wire.Column(ints=v.ints[:50].tolist()) for k, v in long.items()}
    a = ranker.rank(RankQuery(ad_ids[:20], "search", USER, long, CONTEXT))
    b = ranker.rank(RankQuery(ad_ids[:20], "search", USER, cut, CONTEXT))
    np.testing.assert_allclose(a.pctr, b.pctr, rtol=1e-6)


def test_batched_variant_equals_one_request_at_a_time(ranker, ad_ids):
    prepared = [ranker.prepare(RankQuery(ad_ids[i * 50:(i + 1) * 50 + i], "search",
                                         {**USER, "age_bucket": i}, hist(10 + 7 * i, i),
                                         CONTEXT)) for i in range(3)]
    with torch.inference_mode():
        full = ranker.model(expanded_batch(prepared))
    joined = np.concatenate([ranker.score(p).pctr for p in prepared])
    np.testing.assert_allclose(full["pctr"].numpy(), joined, rtol=1e-4, atol=1e-6)
    results = run_batch([(ranker, p) for p in prepared])
    np.testing.assert_allclose(np.concatenate([r.pctr for r in results]), joined, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: bf16 autocast only runs on the GPU path")
def test_gpu_autocast_agrees_with_fp32_within_tolerance(bundle, ad_ids):
    # Stated tolerance: bf16 keeps ~3 significant digits; probabilities agree within 0.01
    # absolute and the candidate order barely moves (Spearman > 0.98).
    from scipy.stats import spearmanr

    fp32 = Ranker.from_bundle(bundle, device="cuda", amp="off")
    bf16 = Ranker.from_bundle(bundle, device="cuda", amp="bf16")
    query = RankQuery(ad_ids[:200], "search", USER, hist(50), CONTEXT)
    a, b = fp32.rank(query), bf16.rank(query)
    assert np.abs(a.pctr - b.pctr).max() < 1e-2 and np.abs(a.pcvr - b.pcvr).max() < 1e-2
    assert spearmanr(a.pctr, b.pctr).statistic > 0.98
    many = bf16.score_many([bf16.prepare(query), bf16.prepare(query)])
    assert np.abs(many[0].pctr - a.pctr).max() < 1e-2


def test_batcher_groups_concurrent_requests_and_keeps_order():
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [i * 10 for i in items]

    batcher = MicroBatcher(run, BatchSettings(True, max_batch=100, max_delay_us=50_000))
    futures = [batcher.submit(i, 10) for i in range(5)]
    results = [f.result(timeout=5) for f in futures]
    assert [r.value for r in results] == [0, 10, 20, 30, 40]
    assert seen == [[0, 1, 2, 3, 4]] and results[0].batch_size == 50
    assert results[0].queue_s >= results[-1].queue_s >= 0
    # a batch never exceeds max_batch: the overflow request starts the next batch
    futures = [batcher.submit(i, 60) for i in (7, 8)]
    assert [f.result(timeout=5).value for f in futures] == [70, 80]
    assert seen[1:] == [[7], [8]]
    batcher.close()


def test_batcher_waits_at_most_the_delay_and_passes_errors():
    def run(items: list[int]) -> list[int]:
        if -1 in items:
            raise RuntimeError("model failed")
        return items

    batcher = MicroBatcher(run, BatchSettings(True, max_batch=1000, max_delay_us=20_000))
    start = time.perf_counter()
    assert batcher.submit(1, 1).result(timeout=5).value == 1
    assert time.perf_counter() - start < 1.0
    with pytest.raises(RuntimeError, match="model failed"):
        batcher.submit(-1, 1).result(timeout=5)
    assert batcher.submit(2, 1).result(timeout=5).value == 2  # the worker survived
    batcher.close()


def test_concurrent_ranking_through_the_batcher_matches_direct(ranker, ad_ids):
    batcher = MicroBatcher(run_batch, BatchSettings(True, max_batch=1000, max_delay_us=20_000))
    queries = [RankQuery(ad_ids[i:i + 40], "search", USER, hist(8, i), CONTEXT)
               for i in range(4)]
    out: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        out[i] = batcher.submit((ranker, ranker.prepare(queries[i])), 40).result(5).value.pctr

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, query in enumerate(queries):
        np.testing.assert_allclose(out[i], ranker.rank(query).pctr, rtol=1e-6)
    batcher.close()
