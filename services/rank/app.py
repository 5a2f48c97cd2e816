"""The ranking stage's HTTP app: `Ranker` (+ micro-batcher) behind the shared stage adapter.

Routes (besides /healthz, /readyz, /metrics, /admin/reload from stage_app):
- POST /v1/rank        RankRequest -> RankResponse (pCTR, pCVR, pCTCVR per candidate)
- POST /admin/ads      CatalogUpdate -> CatalogUpdateResponse (a new ad's features)

Options come from `Settings.extra` (the settings file), with these keys and defaults:
`rank_device` (CUDA when present, else CPU), `rank_amp` ("bf16"; "fp16"/"off"),
`rank_batching` (null = on for GPU, off for CPU), `rank_max_batch` (4096 candidates),
`rank_max_delay_us` (500), `rank_max_candidates` (1000 per request: 413 above),
`rank_max_history` (1000 behaviours: 413 above; longer than the schema's sequence length is
cut to the newest), `rank_threads` (request threads; 4 on CPU, 64 with batching).

Run: `cascade serve rank`, or `uvicorn services.rank.app:create_app --factory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI

from services.common import wire
from services.common.config import Settings
from services.common.deadline import Deadline
from services.common.stage_app import (
    Endpoint,
    StageLimits,
    StageRuntime,
    catalog_follow,
    create_stage_app,
    runtime_of,
    stage_key,
)
from services.rank.batcher import BatchSettings, MicroBatcher
from services.rank.ranker import resolve_device
from services.rank.state import RankState, load_rank_state, run_batch

STAGE = "rank"
ENDPOINT = "/v1/rank"


@dataclass(frozen=True)
class RankOptions:
    """The ranking stage's knobs (see the module docstring for the settings keys)."""

    device: str | None = None
    amp: str = "bf16"
    batching: BatchSettings = BatchSettings()
    max_candidates: int = 1000
    max_history: int = 1000
    threads: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> RankOptions:
        extra: dict[str, Any] = settings.extra or {}
        device = extra.get("rank_device")
        on_gpu = resolve_device(device).type == "cuda"
        enabled = extra.get("rank_batching")
        enabled = on_gpu if enabled is None else bool(enabled)
        batching = BatchSettings(enabled=enabled,
                                 max_batch=int(extra.get("rank_max_batch", 4096)),
                                 max_delay_us=int(extra.get("rank_max_delay_us", 500)))
        return cls(device=device, amp=str(extra.get("rank_amp", "bf16")), batching=batching,
                   max_candidates=int(extra.get("rank_max_candidates", 1000)),
                   max_history=int(extra.get("rank_max_history", 1000)),
                   threads=int(extra.get("rank_threads", 64 if enabled else 4)))


def _endpoints(runtime_ref: dict[str, StageRuntime],
               batcher: MicroBatcher | None) -> tuple[Endpoint, ...]:
    def rank(state: RankState, request: wire.RankRequest,
             deadline: Deadline) -> wire.RankResponse:
        timed = state.score(request, deadline, batcher)
        if batcher is not None and "runtime" in runtime_ref:
            # The batch wait and the model call, apart from the stage's own thread queue.
            metrics = runtime_ref["runtime"].metrics
            metrics.queue.labels(STAGE, f"{ENDPOINT}:batch").observe(timed.queue_s)
            metrics.compute.labels(STAGE, f"{ENDPOINT}:batch").observe(timed.compute_s)
        scores = timed.value
        return wire.RankResponse(ad_ids=scores.ad_ids, pctr=scores.pctr, pcvr=scores.pcvr,
                                 pctcvr=scores.pctcvr,
                                 info=wire.StageInfo(model_version=state.version))

    def update(state: RankState, request: wire.CatalogUpdate,
               deadline: Deadline) -> wire.CatalogUpdateResponse:
        return state.update(request)

    return (
        Endpoint(ENDPOINT, wire.RankRequest, rank,
                 count_in=lambda request: len(request.ad_ids),
                 count_out=lambda response: len(response.ad_ids)),
        Endpoint("/admin/ads", wire.CatalogUpdate, update, admin=True),
    )


def create_app(settings: Settings | None = None, *, bundle: str | None = None,
               state: RankState | None = None, options: RankOptions | None = None) -> FastAPI:
    """The ranking app. `state` skips loading (embedded use and tests)."""
    settings = settings or Settings.from_env()
    options = options or RankOptions.from_settings(settings)
    load = partial(load_rank_state, device=options.device, threads=settings.torch_threads,
                   amp=options.amp)
    runtime_ref: dict[str, StageRuntime] = {}

    def on_batch(candidates: int, requests: int) -> None:
        if "runtime" in runtime_ref:
            runtime_ref["runtime"].metrics.observe_batch(candidates)

    batcher = (MicroBatcher(run_batch, options.batching, on_batch, name="rank-batcher")
               if options.batching.enabled else None)
    limits = StageLimits(max_candidates=options.max_candidates,
                         max_history=options.max_history, threads=options.threads)
    app = create_stage_app(STAGE, load, endpoints=_endpoints(runtime_ref, batcher),
                           bundle=bundle or settings.bundle, limits=limits,
                           internal_key=stage_key(settings), state=state,
                           catalog=catalog_follow(settings))
    runtime_ref["runtime"] = runtime_of(app)
    app.state.batcher = batcher
    return app
