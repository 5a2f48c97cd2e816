"""The gateway's operations for its OpenAPI document (built by services/common/openapi.py):
/v1 with the frontend key, /admin with the admin key (403 for the frontend key there)."""

from __future__ import annotations

from fastapi import FastAPI

from services.common import openapi as doc
from services.common import wire
from services.common.openapi import Operation

DESCRIPTION = ("Cascade ad gateway. Every /v1 and /admin call needs the X-API-Key header "
               "(the admin key on /admin).")
ADMIN = {"403": "the frontend key may not use /admin"}
ADMIN_ID = {**ADMIN, "404": "no such campaign or ad (or an id that is not a non-negative "
                            "integer)"}


def _operations() -> dict[tuple[str, str], Operation]:
    from services.gateway import admin

    return {
        ("/v1/ads", "post"): Operation(wire.AdsRequest, wire.AdsResponse, "Ranked, priced ads"),
        ("/v1/events", "post"): Operation(
            wire.EventRequest, wire.EventResponse, "Report an impression, click or conversion",
            {"503": "overloaded, or the store unreachable for an event: retry later"}),
        ("/admin/campaigns", "post"): Operation(admin.CampaignBody, None, "Create a campaign",
                                                ADMIN),
        ("/admin/campaigns/{campaign_id}", "patch"): Operation(
            admin.CampaignPatch, None, "Change a campaign", ADMIN_ID),
        ("/admin/campaigns/{campaign_id}/pause", "post"): Operation(
            None, None, "Pause a campaign", ADMIN_ID),
        ("/admin/ads", "post"): Operation(admin.AdBody, None, "Create an ad", ADMIN),
        ("/admin/ads/{ad_id}", "patch"): Operation(admin.AdPatch, None, "Change an ad", ADMIN_ID),
        ("/admin/ads/{ad_id}/pause", "post"): Operation(None, None, "Pause an ad", ADMIN_ID),
        ("/admin/reload", "post"): Operation(wire.ReloadRequest, None,
                                             "Switch every stage to a bundle, or none", ADMIN),
        ("/admin/export", "post"): Operation(admin.ExportBody, None,
                                             "Export served traffic as a training set", ADMIN),
    }


def install_openapi(app: FastAPI) -> None:
    doc.install_openapi(app, _operations, DESCRIPTION,
                        "the frontend key on /v1, the admin key on /admin")
