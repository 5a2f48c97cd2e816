"""`cascade bench stages`: each serving stage's latency on one CPU thread, beside a naive
reference measured in the same run on the same inputs.

- retrieval: `RetrievalState.handle` (user tower from raw features + the tuned faiss index +
  eligibility) for top-K, against exact search (`IndexFlatIP`) over the same vectors; recall is
  |approx ∩ exact| / K per request, averaged, where exact is the top K of the ads the request
  may be shown (the same eligibility filter);
- prerank: `PrerankState.handle` over 2,000 candidates (one gather + one matrix product),
  against a per-candidate Python loop that runs the DQM network on one candidate at a time
  (slow: measured on fewer requests, as the JSON says);
- rank: `Ranker.rank` over 200 candidates x 50 behaviours (decomposed attention), against the
  undecomposed DIN+ESMM forward on the expanded batch [N candidates x L history].

Stages are called in-process, without HTTP: the figures are the stages' own work. `per_s` is
requests per second on the one thread (1 / mean latency).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.bundle import read_bundle  # noqa: E402
from services.common import wire  # noqa: E402
from services.common.features import to_tensors  # noqa: E402
from services.common.malloc import tune_malloc  # noqa: E402
from services.common.threads import limit_native_threads  # noqa: E402
from services.prerank.state import load_prerank_state  # noqa: E402
from services.rank.ranker import Ranker, RankQuery, expanded_batch  # noqa: E402
from services.retrieval.index import augment_queries, normalize  # noqa: E402
from services.retrieval.state import (  # noqa: E402
    VECTORS_FILE,
    load_retrieval_state,
    recall_query,
)
from services.retrieval.user_encoder import two_tower_user_encoder  # noqa: E402

RECALL_K = 2000
PRERANK_CANDIDATES = 2000
RANK_CANDIDATES = 200
WARMUP = 5


@dataclass(frozen=True)
class BenchInputs:
    """Requests shared by the fast path and its naive reference."""

    users: list[dict[str, Any]]
    hists: list[dict[str, wire.Column]]
    ad_ids: np.ndarray  # the catalog's ids


def summary(seconds: list[float], candidates: int | None = None) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    out = {"p50_ms": round(float(np.percentile(ms, 50)), 4),
           "p99_ms": round(float(np.percentile(ms, 99)), 4),
           "per_s": round(float(1000.0 / ms.mean()), 1), "requests": int(ms.size)}
    if candidates:
        out["candidates_per_s"] = round(out["per_s"] * candidates, 0)
    return out


def timed(fn: Callable[[int], Any], n: int, warmup: int = WARMUP
          ) -> tuple[list[float], list[Any]]:
    for i in range(min(warmup, n)):
        fn(i)
    times, results = [], []
    for i in range(n):
        start = time.perf_counter()
        results.append(fn(i))
        times.append(time.perf_counter() - start)
    return times, results


def make_inputs(ad_ids: np.ndarray, n: int, history: int, seed: int = 0) -> BenchInputs:
    rng = np.random.default_rng(seed)
    users = [{"age_bucket": int(rng.integers(0, 8)),
              "gender": str(rng.choice(["female", "male", "unknown"])),
              "city_tier": int(rng.integers(0, 5))} for _ in range(n)]
    hists = [{"hist_ad_id": wire.Column(ints=rng.choice(ad_ids, history)),
              "hist_category_id": wire.Column(ints=rng.integers(0, 300, history))}
             for _ in range(n)]
    return BenchInputs(users, hists, ad_ids)


ANN_ONLY = {"category": 0.0, "high_value": 0.0, "new": 0.0}  # recall quotas: the ANN alone


def bench_retrieval(path: str, inputs: BenchInputs, k: int = RECALL_K) -> dict[str, Any]:
    state = load_retrieval_state(path, faiss_threads=1, user_encoder_factory=two_tower_user_encoder)
    bundle = read_bundle(path, verify=False)
    vectors = normalize(bundle.arrays(VECTORS_FILE)["vectors"])
    ad_ids = bundle.arrays(VECTORS_FILE)["ad_ids"]
    requests = [wire.RecallRequest(scene="home_feed", k=k, user=u, hist=h)
                for u, h in zip(inputs.users, inputs.hists, strict=True)]
    fast_t, _ = timed(lambda i: state.handle(requests[i]), len(requests))  # as served
    # the exact reference scores as the index does: a value-aware index's ads carry
    # w·(log eCPM − mu) and its queries a trailing 1 (against plain cosine a value-aware
    # bundle's recall read 0.01)
    value = state.recall.value
    prepare = normalize
    if value is not None:
        vectors, prepare = value.augment(vectors, state.recall.value_of(ad_ids)), augment_queries
    exact_index = faiss.IndexFlatIP(vectors.shape[1])
    exact_index.add(vectors)
    queries = [prepare(state.user_vector(r).reshape(1, -1)) for r in requests]
    exact_t, _ = timed(lambda i: exact_index.search(queries[i], k), len(requests))
    # recall is the index's: the same requests with the other channels off (with them on, a
    # third of K comes from the user's categories by design, not from the vector search)
    ann_only = [r.model_copy(update={"quotas": ANN_ONLY}) for r in requests]
    fast = [state.handle(r) for r in ann_only]
    recalls = [np.intersect1d(got.ad_ids, want).size / max(want.size, 1)
               for got, want in zip(fast, exact_eligible(state, exact_index, ad_ids, queries,
                                                         ann_only, k), strict=True)]
    spec = state.spec.to_dict() if state.spec else {}
    return {**summary(fast_t, k), "recall": round(float(np.mean(recalls)), 4), "k": k,
            "ads": int(ad_ids.size), "index": spec,
            "naive": {**summary(exact_t, k), "what": "exact IndexFlatIP over the same vectors"}}


def exact_eligible(state: Any, exact_index: faiss.Index, ad_ids: np.ndarray,
                   queries: list[np.ndarray], requests: list[wire.RecallRequest], k: int
                   ) -> list[np.ndarray]:
    """Each request's exact top K among the ads it may be shown: served retrieval never
    returns an ineligible (paused, other-scene) ad, so the reference drops them too (against
    the unfiltered top K, recall could not exceed the eligible share: 0.92 at 1M ads)."""
    out = []
    for query, request in zip(queries, requests, strict=True):
        depth = k
        while True:
            depth = min(ad_ids.size, 2 * depth)
            _, rows = exact_index.search(query, depth)
            ids = ad_ids[rows[0][rows[0] >= 0]]
            ids = ids[state.recall.eligible(ids, recall_query(request, None))]
            if ids.size >= k or depth >= ad_ids.size:
                break
        out.append(ids[:k])
    return out


def bench_prerank(path: str, inputs: BenchInputs, candidates: int = PRERANK_CANDIDATES
                  ) -> dict[str, Any]:
    state = load_prerank_state(path, threads=1)
    rng = np.random.default_rng(1)
    cands = [rng.choice(inputs.ad_ids, candidates, replace=False) for _ in inputs.users]
    requests = [wire.PrerankRequest(scene="search", user=u, hist=h, ad_ids=c,
                                    context={"hour": 20, "device": "ios"})
                for u, h, c in zip(inputs.users, inputs.hists, cands, strict=True)]
    fast_t, _ = timed(lambda i: state.handle(requests[i]), len(requests))
    pre = state.preranker
    enc = pre.encoder
    catalog = pre.ads.snapshot()  # noqa: F841 - the fast path's table, kept alive alike

    def naive(i: int) -> np.ndarray:
        """The plain batched forward: the whole DQM network (user, scene and ad towers) over
        the request's candidates in one call, without the precomputed ad vectors."""
        user = {**enc.user(inputs.users[i]), **enc.history(inputs.hists[i]),
                **enc.scene("search", {"hour": 20, "device": "ios"})}
        ads = enc.ads({"ad_id": cands[i], "category_id": cands[i] % 300 + 1}, candidates)
        batch = {name: np.repeat(value, candidates, axis=0) for name, value in user.items()}
        with torch.inference_mode():
            return pre.model(to_tensors({**batch, **ads})).float().numpy()

    naive_t, _ = timed(naive, len(requests))
    return {**summary(fast_t, candidates), "candidates": candidates,
            "naive": {**summary(naive_t, candidates),
                      "what": "plain batched forward of the DQM network over the candidates "
                              "(every tower run per request; no precomputed ad vectors)"}}


def bench_rank(path: str, inputs: BenchInputs, candidates: int = RANK_CANDIDATES
               ) -> dict[str, Any]:
    ranker = Ranker.from_bundle(read_bundle(path, verify=False), device="cpu", threads=1)
    rng = np.random.default_rng(2)
    queries = [RankQuery(rng.choice(inputs.ad_ids, candidates, replace=False), "search", u, h,
                         {"hour": 20, "device": "ios"})
               for u, h in zip(inputs.users, inputs.hists, strict=True)]
    fast_t, _ = timed(lambda i: ranker.rank(queries[i]), len(queries))
    prepared = [ranker.prepare(q) for q in queries]

    def naive(i: int) -> Any:
        with torch.inference_mode():
            return ranker.model(expanded_batch([prepared[i]]))

    naive_t, _ = timed(naive, len(queries))
    history = int(prepared[0].user[ranker.encoder.behaviour_names[0]].shape[1])
    return {**summary(fast_t, candidates), "candidates": candidates, "history": history,
            "naive": {**summary(naive_t, candidates),
                      "what": "undecomposed DIN+ESMM forward on the expanded batch "
                              f"[{candidates} x {history}] (features already encoded)"}}


def run_stages(path: str, *, requests: int,
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the three stages on one CPU thread (torch, faiss and every BLAS / OpenMP pool),
    malloc set as serving sets it; returns the contract's JSON (its "malloc_tuned" says
    whether the setting applied, "native_pools" the thread count of each pool)."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    pools = limit_native_threads(1)  # numpy's BLAS too: the pre-ranker is numpy
    malloc_tuned = tune_malloc()
    bundle = read_bundle(path)
    ad_ids = bundle.arrays(VECTORS_FILE)["ad_ids"]
    inputs = make_inputs(ad_ids, requests, bundle.schema.sequence_len)
    say(f"bench: retrieval top-{RECALL_K} over {ad_ids.size:,} ads, {requests} requests")
    retrieval = bench_retrieval(path, inputs)
    say(f"bench: prerank {PRERANK_CANDIDATES} candidates")
    prerank = bench_prerank(path, inputs)
    say(f"bench: rank {RANK_CANDIDATES} candidates x {bundle.schema.sequence_len} behaviours")
    rank = bench_rank(path, inputs)
    return {"retrieval": retrieval, "prerank": prerank, "rank": rank,
            "bundle": bundle.version, "threads": 1, "torch": torch.__version__,
            "faiss": faiss.__version__, "cpu": os.cpu_count(), "malloc_tuned": malloc_tuned,
            "native_pools": pools}
