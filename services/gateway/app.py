"""The gateway's HTTP surface: POST /v1/ads, POST /v1/events, /admin, health and metrics.

Keys: `X-API-Key` must be the frontend key (CASCADE_API_KEY) on /v1 and the admin key
(CASCADE_ADMIN_KEY) on /admin; missing or wrong -> 401, the frontend key on /admin -> 403. With
auth on, the app refuses to be built without both keys (and the token secret).

Bad input never writes anything: the body is size-checked while streaming (413), decoded and
validated (422 naming the field), and checked against the scene rules (unknown scene, too many
slots: 422 naming the field) before the cascade or the event log sees it. JSON by default,
protobuf when the Content-Type (or Accept) says so.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import ValidationError

from services.common import wire
from services.common.admission import AdmissionMiddleware, arrived
from services.common.config import Settings
from services.common.events import EventLogUnavailable
from services.common.stage_app import HttpError, error_response, json_response, read_body
from services.common.telemetry import METRICS_CONTENT_TYPE, METRICS_ROUTE, READYZ_ROUTE
from services.gateway.health import GatewayHealth
from services.gateway.service import EventRejected, Gateway

EVENT_BODY_LIMIT = 16 * 1024
EVENT_RETRY_AFTER_S = 1


def validation_error(exc: ValidationError) -> HttpError:
    """422 whose `field` names the first bad field and whose detail says what is wrong."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": "invalid body"}
    field = ".".join(str(p) for p in first["loc"]) or "body"
    return HttpError(422, f"{field}: {first['msg']}", field)


MIN_KEY_CHARS = 16


def check_keys(settings: Settings) -> None:
    """Refuse to run open by accident: keys (and a token secret) unless CASCADE_AUTH=off.

    Each key has at least MIN_KEY_CHARS characters, and the admin key is not the frontend key
    (else every frontend could edit campaigns)."""
    if not settings.auth:
        return
    named = (("CASCADE_API_KEY", settings.api_key), ("CASCADE_ADMIN_KEY", settings.admin_key),
             ("CASCADE_TOKEN_SECRET", settings.token_secret))
    missing = [name for name, value in named if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: the gateway refuses to start without "
                         f"keys (set them, or CASCADE_AUTH=off for a local demo)")
    if any((settings.retrieval_url, settings.prerank_url, settings.rank_url)):
        if not settings.internal_key:
            raise ValueError("CASCADE_INTERNAL_KEY not set: the stage services refuse calls "
                             "without it, and the gateway sends it")
        named += (("CASCADE_INTERNAL_KEY", settings.internal_key),)
    short = [name for name, value in named if len(value or "") < MIN_KEY_CHARS]
    if short:
        raise ValueError(f"{', '.join(short)} shorter than {MIN_KEY_CHARS} characters: the "
                         f"gateway refuses to start with guessable keys")
    if settings.admin_key == settings.api_key:
        raise ValueError("CASCADE_ADMIN_KEY equals CASCADE_API_KEY: the admin key must differ "
                         "from the frontend key")


def same_key(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison (hmac.compare_digest): timing says nothing about the key."""
    if given is None or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def require_key(request: Request, settings: Settings, admin: bool) -> None:
    if not settings.auth:
        return
    key = request.headers.get("x-api-key")
    if admin:
        if same_key(key, settings.admin_key):
            return
        if same_key(key, settings.api_key):
            raise HttpError(403, "the frontend key may not use /admin")
        raise HttpError(401, "missing or wrong X-API-Key for /admin")
    # both comparisons always run, so the time does not say which key matched
    frontend, admin_ok = same_key(key, settings.api_key), same_key(key, settings.admin_key)
    if not (frontend or admin_ok):
        raise HttpError(401, "missing or wrong X-API-Key")


async def decode_body(request: Request, model: type[wire.WireModel], limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return wire.decode(model, body, request.headers.get("content-type"))
    except ValidationError as exc:
        raise validation_error(exc) from None
    except wire.WireError as exc:
        raise HttpError(422, str(exc), "body") from None


def guarded(metrics: Any, endpoint: str,
            handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """HttpError -> its JSON answer; every status counted."""
    async def route(request: Request) -> Response:
        try:
            response = await handler(request)
        except HttpError as exc:
            response = error_response(exc)
        metrics.responses.labels(endpoint, str(response.status_code)).inc()
        return response

    return route


def create_app(gateway: Gateway, *, start: bool = True) -> FastAPI:
    """The gateway app around a built `Gateway` (see service.py and stage_loaders.py)."""
    settings, config = gateway.settings, gateway.config
    check_keys(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start and not gateway.started:
            await gateway.start()
        yield
        await gateway.stop()

    app = FastAPI(title="cascade gateway", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(AdmissionMiddleware, gates=gateway.admission,
                       on_shed=lambda path: gateway.metrics.responses.labels(path, "503").inc())

    async def ads(request: Request) -> Response:
        require_key(request, settings, admin=False)
        parsed: wire.AdsRequest = await decode_body(request, wire.AdsRequest,
                                                    config.max_body_bytes)
        rules = config.scenes.get(parsed.scene)
        if rules is None:
            raise HttpError(422, f"unknown scene '{parsed.scene}' (known: "
                                 f"{', '.join(sorted(config.scenes))})", "scene")
        if parsed.slots > rules.max_slots:
            raise HttpError(422, f"slots: {parsed.slots} is more than the {rules.max_slots} "
                                 f"allowed for scene '{parsed.scene}'", "slots")
        result = await gateway.serve_ads(parsed, arrived(request.scope))
        accept = request.headers.get("accept") or ""
        media = wire.media_type(accept if "protobuf" in accept
                                else request.headers.get("content-type"))
        return Response(wire.encode(result, media), media_type=media)

    async def events(request: Request) -> Response:
        require_key(request, settings, admin=False)
        parsed: wire.EventRequest = await decode_body(request, wire.EventRequest,
                                                      EVENT_BODY_LIMIT)
        try:
            result = await gateway.accept_event(parsed)
        except EventRejected as exc:
            raise HttpError(422, f"token: {exc}", "token") from None
        except EventLogUnavailable as exc:  # not appended: safe to retry with the same id
            response = json_response(503, {"detail": f"{exc}; retry with the same event_id"})
            response.headers["Retry-After"] = str(EVENT_RETRY_AFTER_S)
            return response
        return Response(wire.encode(result), media_type=wire.JSON)

    app.add_api_route("/v1/ads", guarded(gateway.metrics, "/v1/ads", ads), methods=["POST"])
    app.add_api_route("/v1/events", guarded(gateway.metrics, "/v1/events", events),
                      methods=["POST"])

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(200, {"status": "ok", "service": "gateway"})

    # one per gateway: its gauges live in the gateway's registry (an app may be built twice)
    health = getattr(gateway, "health", None) or GatewayHealth(gateway)
    gateway.health = health
    app.state.health = health

    @app.get("/readyz", **READYZ_ROUTE)
    async def readyz() -> Response:
        ok, body = await health.check()
        return json_response(200 if ok else 503, body)

    @app.get("/metrics", **METRICS_ROUTE)
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    from services.gateway.admin import add_admin_routes

    add_admin_routes(app, gateway)
    from services.gateway.openapi import install_openapi

    install_openapi(app)
    return app
