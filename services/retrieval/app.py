"""The retrieval stage's HTTP app: `Recall` behind the shared stage adapter.

Routes (besides /healthz, /readyz, /metrics, /admin/reload from stage_app):
- POST /v1/recall      RecallRequest -> RecallResponse
- POST /admin/ads      CatalogUpdate -> CatalogUpdateResponse (new ad, scenes, pause)

Run: `cascade serve retrieval`, or `uvicorn services.retrieval.app:create_app --factory`
(reads CASCADE_BUNDLE, CASCADE_FAISS_THREADS, CASCADE_ADMIN_KEY). Set OMP_WAIT_POLICY=PASSIVE in
the environment of the process, so OpenMP threads sleep instead of spinning between requests.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from functools import partial  # noqa: E402

from fastapi import FastAPI  # noqa: E402

from services.common import wire  # noqa: E402
from services.common.config import Settings  # noqa: E402
from services.common.deadline import Deadline  # noqa: E402
from services.common.stage_app import (  # noqa: E402
    Endpoint,
    StageLimits,
    catalog_follow,
    create_stage_app,
    stage_key,
)
from services.retrieval.state import (  # noqa: E402
    RetrievalState,
    catalog_update,
    load_retrieval_state,
)
from services.retrieval.user_encoder import two_tower_user_encoder  # noqa: E402

STAGE = "retrieval"


def _recall(state: RetrievalState, request: wire.RecallRequest,
            deadline: Deadline) -> wire.RecallResponse:
    return state.handle(request, deadline)


def _update(state: RetrievalState, request: wire.CatalogUpdate,
            deadline: Deadline) -> wire.CatalogUpdateResponse:
    return state.update(request)


ENDPOINTS = (
    Endpoint("/v1/recall", wire.RecallRequest, _recall,
             count_out=lambda response: len(response.ad_ids)),
    Endpoint("/admin/ads", wire.CatalogUpdate, _update, admin=True),
)


def create_app(settings: Settings | None = None, *, bundle: str | None = None,
               state: RetrievalState | None = None, limits: StageLimits | None = None,
               loader=None) -> FastAPI:
    """The retrieval app. `state` skips loading (embedded use and tests); `loader` overrides
    how a bundle path becomes a state (the lead plugs in the user tower this way)."""
    settings = settings or Settings.from_env()
    load = loader or partial(
        load_retrieval_state, faiss_threads=settings.faiss_threads,
        user_encoder_factory=partial(two_tower_user_encoder, threads=settings.torch_threads))
    return create_stage_app(STAGE, load, endpoints=ENDPOINTS, bundle=bundle or settings.bundle,
                            limits=limits, internal_key=stage_key(settings),
                            state=state, catalog=catalog_follow(settings, catalog_update))
