"""/admin: campaigns and ads (create, update, pause), bundle reload, served-traffic export.

A new ad serves on the next request, before any retraining: the gateway computes its two-tower
vector from its raw features (the bundle's ad tower), hands the stages a `CatalogUpdate`
(in-process, or POST /admin/ads on HTTP stages; DQM computes its own vector from the features),
then writes the store and its local catalog. Stages are updated FIRST: if one refuses, nothing
is written and the answer (502) names the stage, and an ad the stages know but the catalog does
not is dropped by screening, so a half-done update never serves.

Push is the fast path only: a stage process started later (a restart, an autoscaled replica)
catches up on the same changes from Redis by itself (`CatalogFollower`, stage_app.py).

Validation happens before any write (422 naming the field): unknown campaign, unknown scene,
a CPC ad without a bid, an oCPA ad without a target CPA.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import Field

from models.pricing import qscore_ecpm
from services.common import wire
from services.common.stage_app import HttpError
from services.common.store import Ad, Campaign, ad_features
from services.gateway.app import decode_body, guarded, json_response, require_key
from services.gateway.clients import StageError
from services.gateway.service import Gateway

log = logging.getLogger(__name__)

ADMIN_BODY_LIMIT = 64 * 1024


class CampaignBody(wire.WireModel):
    campaign_id: int = Field(ge=1, le=wire.INT64_MAX)
    advertiser_id: int = Field(default=0, ge=0, le=wire.INT64_MAX)
    daily_budget_micros: int = Field(ge=0, le=wire.MAX_MICROS)
    status: str = Field(default="active", pattern="^(active|paused)$")


class CampaignPatch(wire.WireModel):
    daily_budget_micros: int | None = Field(default=None, ge=0, le=wire.MAX_MICROS)
    status: str | None = Field(default=None, pattern="^(active|paused)$")


class AdBody(wire.WireModel):
    ad_id: int = Field(ge=1, le=wire.INT64_MAX)
    campaign_id: int = Field(ge=1, le=wire.INT64_MAX)
    advertiser_id: int = Field(default=0, ge=0, le=wire.INT64_MAX)
    category_id: int = Field(default=0, ge=0, le=wire.INT64_MAX)
    category_l1: int = Field(default=0, ge=0, le=wire.INT64_MAX)
    brand_id: int = Field(default=0, ge=0, le=wire.INT64_MAX)
    price_micros: int = Field(default=0, ge=0, le=wire.MAX_MICROS)
    price_bucket: int = Field(default=0, ge=0, le=9)
    bid_type: str = Field(default="cpc", pattern="^(cpc|ocpa)$")
    bid_micros: int = Field(default=0, ge=0, le=wire.MAX_MICROS)
    target_cpa_micros: int = Field(default=0, ge=0, le=wire.MAX_MICROS)
    scenes: list[str] = Field(min_length=1)
    creative_id: str = Field(default="", max_length=256)
    status: str = Field(default="active", pattern="^(active|paused)$")


class AdPatch(wire.WireModel):
    bid_micros: int | None = Field(default=None, ge=0, le=wire.MAX_MICROS)
    target_cpa_micros: int | None = Field(default=None, ge=0, le=wire.MAX_MICROS)
    scenes: list[str] | None = Field(default=None, min_length=1)
    status: str | None = Field(default=None, pattern="^(active|paused)$")
    creative_id: str | None = Field(default=None, max_length=256)


class ExportBody(wire.WireModel):
    """Where to write: a relative path under the export directory (CASCADE_EXPORT_DIR)."""

    out: str = Field(min_length=1, max_length=255)


async def reload_all(stages: dict[str, Any], bundle: str | None,
                     pin: Callable[[str], None] = lambda version: None) -> dict[str, Any]:
    """Switch every stage to `bundle`, or none: each stage first loads and verifies it beside
    the old one (prepare); only when all have, each switches (commit). A stage that fails to
    prepare -> every staged bundle is dropped, 422 naming the stage; nothing switched. A commit
    that fails (a stage process died meanwhile) -> the stages already switched roll back, 503.

    Any loader error counts (a corrupt safetensors or faiss file raises its library's own
    exception class), so a bad bundle is a 422, never a 500.

    `pin(version)` sets the bundle version the gateway pins its requests to: the one every stage
    served before (as each stage's prepare reports it) while the stages switch one by one, then
    the new one once all have, or the old one again after a rollback. A stage that switched
    keeps the old state for requests pinned to it, so no answer mixes two bundles."""
    prepared: list[tuple[str, Any]] = []
    before: set[str] = set()
    for name, client in stages.items():
        try:
            before.add(str((await client.prepare(bundle)).previous))
        except Exception as exc:  # noqa: BLE001 - any failure keeps every old bundle
            for _, done in prepared:
                await _quietly(done.abort())
            await _quietly(client.abort())
            raise HttpError(422, f"reload of {name} failed, every stage kept the old bundle: "
                                 f"{type(exc).__name__}: {exc}"[:1000], "bundle") from None
        prepared.append((name, client))
    old = before.pop() if len(before) == 1 else ""  # stages on different bundles: no pin
    pin(old)
    out: dict[str, Any] = {}
    committed: list[Any] = []
    for name, client in prepared:
        try:
            result = await client.commit()
        except Exception as exc:  # noqa: BLE001
            for done in committed:
                await _quietly(done.rollback())
            for _, rest in prepared[len(committed) + 1:]:
                await _quietly(rest.abort())
            raise HttpError(503, f"commit of {name} failed, rolled back: {exc}"[:1000],
                            "bundle") from None
        committed.append(client)
        out[name] = {"version": result.version, "previous": result.previous}
    after = {entry["version"] for entry in out.values()}
    pin(after.pop() if len(after) == 1 else "")
    return out


async def _quietly(step: Any) -> None:
    try:
        await step
    except Exception:  # noqa: BLE001 - best effort clean-up; the error answer says the rest
        log.exception("reload clean-up step failed")


def _check_ad(gateway: Gateway, ad: Ad) -> None:
    if not gateway.catalog.has_campaign(ad.campaign_id):
        raise HttpError(422, f"campaign_id: campaign {ad.campaign_id} does not exist "
                             f"(create it first)", "campaign_id")
    unknown = [s for s in ad.scenes if s not in gateway.config.scenes]
    if unknown:
        raise HttpError(422, f"scenes: unknown scene(s) {unknown} (known: "
                             f"{sorted(gateway.config.scenes)})", "scenes")
    if ad.bid_type == "cpc" and ad.bid_micros <= 0:
        raise HttpError(422, "bid_micros: a CPC ad needs a bid > 0", "bid_micros")
    if ad.bid_type == "ocpa" and ad.target_cpa_micros <= 0:
        raise HttpError(422, "target_cpa_micros: an oCPA ad needs a target CPA > 0",
                        "target_cpa_micros")


async def push_ad(gateway: Gateway, ad: Ad) -> dict[str, Any]:
    """Stages first, then the store and the local catalog (see the module docstring)."""
    _check_ad(gateway, ad)
    known = ad.ad_id in gateway.catalog
    vector = None
    if not known and gateway.stages.vectorizer is not None:
        vector = gateway.stages.vectorizer.ad_vector(ad_features(ad))
    estimate = qscore_ecpm(gateway.qscores.prior.prior_mean, ad.bid_type == "ocpa",
                           ad.bid_micros, ad.target_cpa_micros, gateway.cascade.prior_cvr)
    update = wire.CatalogUpdate(ad_id=ad.ad_id, vector=vector, scenes=list(ad.scenes),
                                status=ad.status, cold_score=float(estimate),
                                features=ad_features(ad))
    stages: dict[str, Any] = {}
    for name, client in gateway.stages.all().items():
        try:
            answer = await client.update(update)
        except (StageError, ValueError, KeyError) as exc:
            raise HttpError(502, f"stage {name} refused the ad: {exc}", name) from None
        stages[name] = answer.added if answer is not None else None
    await gateway.store.upsert_ad(ad)
    await asyncio.to_thread(gateway.catalog.apply_ads, [ad])
    return {"ad_id": ad.ad_id, "created": not known, "status": ad.status, "stages": stages}


async def push_campaign(gateway: Gateway, campaign: Campaign) -> dict[str, Any]:
    known = gateway.catalog.has_campaign(campaign.campaign_id)
    await gateway.store.upsert_campaign(campaign)
    await asyncio.to_thread(gateway.catalog.apply_campaigns, [campaign])  # pacing reads it too
    return {"campaign_id": campaign.campaign_id, "created": not known, "status": campaign.status,
            "daily_budget_micros": campaign.daily_budget_micros}


async def _ad(gateway: Gateway, ad_id: int) -> Ad:
    """The stored ad (the store is the source of truth; the catalog keeps serving columns)."""
    ad = (await gateway.store.get_ads([ad_id])).get(ad_id)
    if ad is None:
        raise HttpError(404, f"ad {ad_id} does not exist", "ad_id")
    return ad


async def _campaign(gateway: Gateway, campaign_id: int) -> Campaign:
    campaign = (await gateway.store.get_campaigns([campaign_id])).get(campaign_id)
    if campaign is None:
        raise HttpError(404, f"campaign {campaign_id} does not exist", "campaign_id")
    return campaign


def add_admin_routes(app: FastAPI, gateway: Gateway) -> None:
    """Register /admin/* on the gateway app (admin key required)."""
    settings = gateway.settings

    def route(path: str, method: str, handler: Any) -> None:
        async def run(request: Request) -> Response:
            require_key(request, settings, admin=True)
            return json_response(200, await handler(request))

        app.add_api_route(path, guarded(gateway.metrics, path, run), methods=[method])

    async def create_campaign(request: Request) -> dict[str, Any]:
        body = await decode_body(request, CampaignBody, ADMIN_BODY_LIMIT)
        return await push_campaign(gateway, Campaign(**body.model_dump()))

    async def patch_campaign(request: Request) -> dict[str, Any]:
        current = await _campaign(gateway, int(request.path_params["campaign_id"]))
        body = await decode_body(request, CampaignPatch, ADMIN_BODY_LIMIT)
        return await push_campaign(gateway, replace(current, **body.model_dump(exclude_none=True)))

    async def pause_campaign(request: Request) -> dict[str, Any]:
        current = await _campaign(gateway, int(request.path_params["campaign_id"]))
        return await push_campaign(gateway, replace(current, status="paused"))

    async def create_ad(request: Request) -> dict[str, Any]:
        body = await decode_body(request, AdBody, ADMIN_BODY_LIMIT)
        data = body.model_dump()
        data["scenes"] = tuple(data["scenes"])
        return await push_ad(gateway, Ad(**data))

    async def patch_ad(request: Request) -> dict[str, Any]:
        current = await _ad(gateway, int(request.path_params["ad_id"]))
        changes = (await decode_body(request, AdPatch, ADMIN_BODY_LIMIT)).model_dump(
            exclude_none=True)
        if "scenes" in changes:
            changes["scenes"] = tuple(changes["scenes"])
        return await push_ad(gateway, replace(current, **changes))

    async def pause_ad(request: Request) -> dict[str, Any]:
        current = await _ad(gateway, int(request.path_params["ad_id"]))
        return await push_ad(gateway, replace(current, status="paused"))

    async def reload(request: Request) -> dict[str, Any]:
        body = await decode_body(request, wire.ReloadRequest, ADMIN_BODY_LIMIT)
        out = await reload_all(gateway.stages.all(), body.bundle or None, gateway.pin_version)
        await gateway.follow_bundle(body.bundle or gateway.settings.bundle)
        return out

    async def export(request: Request) -> dict[str, Any]:
        from services.gateway.served_log import export_path, export_training_set

        body = await decode_body(request, ExportBody, ADMIN_BODY_LIMIT)
        try:
            out = export_path(gateway.settings.export_dir, body.out)
            return await export_training_set(gateway.sources(), out)
        except ValueError as exc:
            raise HttpError(422, str(exc), "out") from None

    route("/admin/campaigns", "POST", create_campaign)
    route("/admin/campaigns/{campaign_id:int}", "PATCH", patch_campaign)
    route("/admin/campaigns/{campaign_id:int}/pause", "POST", pause_campaign)
    route("/admin/ads", "POST", create_ad)
    route("/admin/ads/{ad_id:int}", "PATCH", patch_ad)
    route("/admin/ads/{ad_id:int}/pause", "POST", pause_ad)
    route("/admin/reload", "POST", reload)
    route("/admin/export", "POST", export)
