"""The gateway's OpenAPI document, describing what the routes really take and answer.

The routes read raw `Request`s (size-checked streaming, JSON or protobuf), so FastAPI cannot see
their bodies. This fills them in from the pydantic wire models: each operation's request body,
its 200 answer, the error answers it can give (401, 403 for /admin, 408, 413, 422, 503 with
Retry-After) and the `X-API-Key` security scheme. /docs and /openapi.json stay open: they
describe the API, they do not call it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from services.common import wire

SCHEME = "ApiKey"
ERROR = {
    "type": "object", "required": ["detail"],
    "properties": {"detail": {"description": "what is wrong (a string, or a list of problems)"},
                   "field": {"type": "string", "description": "the offending field"}},
}
ERRORS = {
    "401": "missing or wrong X-API-Key",
    "408": "the request body did not arrive within the read timeout",
    "413": "body too large",
    "422": "malformed body, or a value the API refuses (the field is named)",
}


def _operations() -> dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None,
                                                 str]]:
    """(path, method) -> (request model, 200 model, summary)."""
    from services.gateway import admin

    return {
        ("/v1/ads", "post"): (wire.AdsRequest, wire.AdsResponse, "Ranked, priced ads"),
        ("/v1/events", "post"): (wire.EventRequest, wire.EventResponse,
                                 "Report an impression, click or conversion"),
        ("/admin/campaigns", "post"): (admin.CampaignBody, None, "Create a campaign"),
        ("/admin/campaigns/{campaign_id}", "patch"): (admin.CampaignPatch, None,
                                                      "Change a campaign"),
        ("/admin/campaigns/{campaign_id}/pause", "post"): (None, None, "Pause a campaign"),
        ("/admin/ads", "post"): (admin.AdBody, None, "Create an ad"),
        ("/admin/ads/{ad_id}", "patch"): (admin.AdPatch, None, "Change an ad"),
        ("/admin/ads/{ad_id}/pause", "post"): (None, None, "Pause an ad"),
        ("/admin/reload", "post"): (wire.ReloadRequest, None,
                                    "Switch every stage to a bundle, or none"),
        ("/admin/export", "post"): (admin.ExportBody, None,
                                    "Export served traffic as a training set"),
    }


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="Cascade ad gateway. Every /v1 and /admin call needs the "
                                  "X-API-Key header (the admin key on /admin).")
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR
    components["securitySchemes"] = {
        SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key",
                 "description": "the frontend key on /v1, the admin key on /admin"}}
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for (path, method), (request, response, summary) in _operations().items():
        operation = doc.setdefault("paths", {}).setdefault(path, {}).setdefault(method, {})
        operation["summary"] = summary
        operation["security"] = [{SCHEME: []}]
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _schema(request, schemas)},
                wire.PROTOBUF: {"schema": {"type": "string", "format": "binary"}}}}
        ok: dict[str, Any] = {"description": "OK"}
        if response is not None:
            ok["content"] = {"application/json": {"schema": _schema(response, schemas)}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        answers: dict[str, Any] = {"200": ok}
        for code, text in ERRORS.items():
            answers[code] = {"description": text, "content": error_ref}
        if path.startswith("/admin"):
            answers["403"] = {"description": "the frontend key may not use /admin",
                              "content": error_ref}
        answers["503"] = {
            "description": "overloaded, or the store unreachable for an event: retry later",
            "headers": {"Retry-After": {"schema": {"type": "integer"},
                                        "description": "seconds to wait"}},
            "content": error_ref}
        operation["responses"] = answers
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi` at /openapi.json (built once, on first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
