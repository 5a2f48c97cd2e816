"""The pre-ranking stage's HTTP app: `PreRanker` behind the shared stage adapter.

Routes (besides /healthz, /readyz, /metrics, /admin/reload from stage_app):
- POST /v1/prerank     PrerankRequest -> PrerankResponse (top K by DQM pCTR)
- POST /admin/ads      CatalogUpdate -> CatalogUpdateResponse (a new ad's features)

Run: `cascade serve prerank`, or `uvicorn services.prerank.app:create_app --factory`
(reads CASCADE_BUNDLE, CASCADE_TORCH_THREADS, CASCADE_ADMIN_KEY).
"""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI
from prometheus_client import Counter

from services.common import wire
from services.common.config import Settings
from services.common.deadline import Deadline
from services.common.stage_app import (
    Endpoint,
    StageLimits,
    catalog_follow,
    create_stage_app,
    runtime_of,
    stage_key,
)
from services.prerank.state import PrerankState, load_prerank_state

STAGE = "prerank"
LIMITS = StageLimits(max_candidates=10_000, max_history=1_000, max_k=10_000)


def _endpoints(counters: dict[str, Counter]) -> tuple[Endpoint, ...]:
    def prerank(state: PrerankState, request: wire.PrerankRequest,
                deadline: Deadline) -> wire.PrerankResponse:
        before = state.preranker.unknown_total
        response = state.handle(request, deadline)
        dropped = state.preranker.unknown_total - before
        if dropped > 0:
            counters["unknown"].labels(STAGE).inc(dropped)
        return response

    def update(state: PrerankState, request: wire.CatalogUpdate,
               deadline: Deadline) -> wire.CatalogUpdateResponse:
        return state.update(request)

    return (
        Endpoint("/v1/prerank", wire.PrerankRequest, prerank,
                 count_in=lambda request: len(request.ad_ids),
                 count_out=lambda response: len(response.ad_ids)),
        Endpoint("/admin/ads", wire.CatalogUpdate, update, admin=True),
    )


def create_app(settings: Settings | None = None, *, bundle: str | None = None,
               state: PrerankState | None = None, limits: StageLimits | None = None) -> FastAPI:
    """The pre-ranking app. `state` skips loading (embedded use and tests)."""
    settings = settings or Settings.from_env()
    load = partial(load_prerank_state, threads=settings.torch_threads)
    # The counter lives in the app's own registry, which exists once the app does: the
    # endpoints reach it through this dict, filled right after.
    counters: dict[str, Counter] = {}
    app = create_stage_app(STAGE, load, endpoints=_endpoints(counters),
                           bundle=bundle or settings.bundle, limits=limits or LIMITS,
                           internal_key=stage_key(settings), state=state,
                           catalog=catalog_follow(settings))
    counters["unknown"] = Counter("cascade_unknown_candidates",
                                "Candidate ad ids dropped because the stage has no data for them",
                                ("stage",), registry=runtime_of(app).metrics.registry)
    return app
