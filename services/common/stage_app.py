"""The thin FastAPI adapter every serving stage shares.

A stage is a plain class loaded from a bundle (its "state"); this module gives it the HTTP
surface the architecture fixes: /healthz, /readyz, /metrics, /admin/reload, plus its own POST
endpoints, each declared as an `Endpoint` (path, request model, handler). What every endpoint
gets for free, so no stage re-implements it:

- bodies in JSON or protobuf (services/common/wire.py), answered in the caller's encoding;
- 413 for a body over `max_body_bytes` (checked while streaming, before parsing), 413 naming
  the field for too many candidates / too long a history, 422 naming the field for bad bodies;
- the `X-Cascade-Budget-Ms` budget: a request whose budget is spent on arrival, or that runs
  out while waiting for a worker thread, gets 504 {"detail": "deadline exceeded"} at once
  instead of work nobody will wait for;
- CPU work on a fixed-size thread pool (anyio CapacityLimiter), never on the event loop;
- queue vs compute time, candidates in/out and the served bundle version in Prometheus;
- reload beside the old state and an atomic swap: a request takes a reference to the state
  when it starts, so in-flight requests finish on the old bundle; a failed load keeps the old
  state and answers 422 with the reason (404 when the path does not exist, 409 while another
  reload runs);
- with a Redis URL, catalog catch-up (`CatalogFollower`): the gateway pushes each /admin ad
  change to the stages it knows, but a stage started later (restart, autoscaling) or reloaded
  onto a new bundle would lack them. The follower applies, through the stage's own `update()`,
  every ad change since the store's last bulk load (the catalog a bundle is trained on) when a
  state is installed, then polls `{catalog}:version` every `poll_s` and applies what is new.
  Updates are idempotent, so a change arriving by push and by catch-up is harmless. /readyz
  waits for the first catch-up.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI, Request, Response
from pydantic import ValidationError

from services.common import wire
from services.common.bundle_guard import SchemaMismatch, bundle_schema_sha256, check_same_schema
from services.common.deadline import Deadline, DeadlineExceeded
from services.common.openapi import Operation, install_openapi
from services.common.store import Ad, ad_features
from services.common.telemetry import (
    METRICS_CONTENT_TYPE,
    METRICS_ROUTE,
    READYZ_ROUTE,
    StageMetrics,
)
from services.common.threads import lower_this_thread_once, stage_nice

log = logging.getLogger(__name__)


class StageState(Protocol):
    """What a loader returns: anything that knows which bundle version it serves."""

    version: str


Loader = Callable[[str], StageState]
BODY_READ_TIMEOUT_S = 10.0  # a request body must arrive within this (else 408)


@dataclass(frozen=True)
class StageLimits:
    """Request-size limits and the worker pool size of one stage app."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_candidates: int = 10_000  # ad_ids per request
    max_history: int = 1_000  # behaviour entries per request
    max_k: int = 20_000  # K a caller may ask for
    max_exclusions: int = 100_000
    threads: int = 4  # CPU worker threads (each runs one request: faiss/torch use 1 thread)
    body_timeout_s: float = BODY_READ_TIMEOUT_S  # a stalled body is cut (408) after this


@dataclass(frozen=True)
class Endpoint:
    """One stage method on the wire: POST `path`, `request` model in, a wire model out.

    `handler(state, request, deadline)` runs on a worker thread. `count_in`/`count_out` give
    the candidate counts for the metrics.
    """

    path: str
    request: type[wire.WireModel]
    handler: Callable[[Any, Any, Deadline], wire.WireModel]
    count_in: Callable[[Any], int] | None = None
    count_out: Callable[[Any], int] | None = None
    admin: bool = False  # under /admin: needs the admin key when one is configured


def pinned_state(current: Any, previous: Any, pinned: str) -> Any:
    """The state that scores a request pinned to bundle version `pinned`.

    The gateway pins the version it served before a reload until every stage has switched, so
    a stage that already switched scores those requests with the state it kept (`previous`);
    every answer is then scored by one bundle end to end. Unpinned, or pinned to a version this
    stage does not hold (a restarted stage), it is the current state; the answer's
    `info.model_version` says which.
    """
    if not pinned or current is None or str(current.version) == pinned:
        return current
    if previous is not None and str(previous.version) == pinned:
        return previous
    return current


class HttpError(Exception):
    """An error answer with a status and a JSON body (detail, and the field when known)."""

    def __init__(self, status: int, detail: Any, field: str | None = None):
        super().__init__(str(detail))
        self.status, self.detail, self.field = status, detail, field


def json_response(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body, default=str), status_code=status,
                    media_type=wire.JSON)


def error_response(exc: HttpError) -> Response:
    body: dict[str, Any] = {"detail": exc.detail}
    if exc.field is not None:
        body["field"] = exc.field
    return json_response(exc.status, body)


def _validation_error(exc: ValidationError) -> HttpError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
    detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
    return HttpError(422, detail, first)


def check_limits(request: wire.WireModel, limits: StageLimits) -> None:
    """413 for lists over the limits, 422 for misaligned columns; both name the field."""
    ad_ids = getattr(request, "ad_ids", None)
    if ad_ids is not None and len(ad_ids) > limits.max_candidates:
        raise HttpError(413, f"too many candidates: {len(ad_ids)} > {limits.max_candidates}",
                        "ad_ids")
    hist = getattr(request, "hist", None)
    if hist:
        for name, column in hist.items():
            if len(column) > limits.max_history:
                raise HttpError(413, f"history too long: {len(column)} > {limits.max_history}",
                                f"hist.{name}")
    k = getattr(request, "k", None)
    if k is not None and k > limits.max_k:
        raise HttpError(413, f"k too large: {k} > {limits.max_k}", "k")
    eligibility = getattr(request, "eligibility", None)
    if eligibility is not None and len(eligibility.exclude_ad_ids) > limits.max_exclusions:
        raise HttpError(413, f"too many exclusions: > {limits.max_exclusions}",
                        "eligibility.exclude_ad_ids")
    for name, column in (getattr(request, "ad_features", None) or {}).items():
        if ad_ids is not None and len(column) != len(ad_ids):
            raise HttpError(422, f"ad_features.{name} has {len(column)} values for "
                                 f"{len(ad_ids)} candidates", f"ad_features.{name}")


async def read_body(request: Request, limit: int,
                    timeout_s: float = BODY_READ_TIMEOUT_S) -> bytes:
    """The body, refusing (413) as soon as it passes `limit`: a 10 MB body is never buffered.

    A body that stalls (a slow-loris client sending a byte now and then) is cut after
    `timeout_s` in all with 408, so it cannot hold a connection and a worker forever."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"body too large: {declared} bytes > {limit}", "body")
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout_s) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"body too large: more than {limit} bytes", "body")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise HttpError(408, f"body not received within {timeout_s:g} s", "body")
    return b"".join(chunks)


class StageRuntime:
    """The served state, the worker pool and the metrics of one stage app."""

    def __init__(self, name: str, loader: Loader, *, bundle: str | None = None,
                 limits: StageLimits | None = None, metrics: StageMetrics | None = None):
        self.name = name
        self.loader = loader
        self.bundle = bundle  # what an empty /admin/reload reloads (re-resolving `current`)
        self.limits = limits or StageLimits()
        self.metrics = metrics or StageMetrics(name)
        self.limiter = anyio.CapacityLimiter(self.limits.threads)
        self.thread_nice = stage_nice()  # stage threads run below the event loop (threads.py)
        self.load_error: str | None = None
        self._state: StageState | None = None
        self._reload_lock = threading.Lock()
        self.schema_sha256: str | None = None  # of the served bundle (the reload guard)
        self._staged: tuple[StageState, str | None, str | None] | None = None  # prepared
        self._previous: tuple[StageState | None, str | None, str | None] | None = None

    @property
    def state(self) -> StageState | None:
        return self._state

    def install(self, state: StageState) -> None:
        """Swap in a loaded state (one attribute store: atomic for concurrent readers)."""
        self._state = state
        self.load_error = None
        self.metrics.set_model(str(state.version), time.time())

    def load(self, bundle: str | None = None) -> wire.ReloadResponse:
        """Load `bundle` (or the configured one) beside the current state, then swap.

        Blocking; raises HttpError (the current state is kept) on failure.
        """
        prepared = self.prepare(bundle)
        committed = self.commit()
        committed.load_ms = prepared.load_ms
        return committed

    def prepare(self, bundle: str | None = None) -> wire.ReloadResponse:
        """Phase one of a reload: load and verify `bundle` beside the served state, and hold it
        (staged) without serving it. Blocking; HttpError on failure (nothing staged)."""
        path = bundle or self.bundle
        if not path:
            raise HttpError(422, "no bundle given and none configured (CASCADE_BUNDLE)", "bundle")
        if not Path(path).exists():
            self.metrics.reloads.labels(self.name, "failed").inc()
            raise HttpError(404, f"bundle not found: {path}", "bundle")
        if not self._reload_lock.acquire(blocking=False):
            raise HttpError(409, "another reload is in progress")
        try:
            start = time.perf_counter()
            try:
                new_schema = check_same_schema(self.schema_sha256, path)
            except SchemaMismatch as exc:
                self.metrics.reloads.labels(self.name, "failed").inc()
                raise HttpError(422, str(exc), "bundle") from None
            try:
                state = self.loader(path)
            except Exception as exc:  # any loader failure keeps the old state
                log.exception("stage %s: loading bundle %s failed", self.name, path)
                self.metrics.reloads.labels(self.name, "failed").inc()
                self.load_error = f"{type(exc).__name__}: {exc}"
                kept = self._state.version if self._state is not None else None
                raise HttpError(422, f"reload failed, kept {kept}: {self.load_error}",
                                "bundle") from exc
            self._staged = (state, bundle, new_schema)
            current = self._state.version if self._state is not None else ""
            return wire.ReloadResponse(version=str(state.version), previous=str(current),
                                       load_ms=(time.perf_counter() - start) * 1000)
        finally:
            self._reload_lock.release()

    def commit(self) -> wire.ReloadResponse:
        """Phase two: serve the staged state (one reference swap); the old one is kept for
        `rollback` until the next commit. 409 when nothing is staged."""
        staged, self._staged = self._staged, None
        if staged is None:
            raise HttpError(409, "nothing prepared to commit")
        state, bundle, schema = staged
        previous_state = self._state
        self._previous = (previous_state, self.bundle, self.schema_sha256)
        self.install(state)
        self.schema_sha256 = schema
        if bundle:
            self.bundle = bundle
        self.metrics.reloads.labels(self.name, "ok").inc()
        previous = previous_state.version if previous_state is not None else ""
        return wire.ReloadResponse(version=str(state.version), previous=str(previous))

    def abort(self) -> None:
        """Drop a staged state (another stage failed to prepare)."""
        self._staged = None

    def rollback(self) -> wire.ReloadResponse:
        """Serve the state before the last commit again (another stage failed to commit)."""
        if self._previous is None or self._previous[0] is None:
            raise HttpError(409, "no previous state to roll back to")
        state, bundle, schema = self._previous
        current = self._state.version if self._state is not None else ""
        self._previous = None
        self.install(state)
        self.bundle, self.schema_sha256 = bundle, schema
        return wire.ReloadResponse(version=str(state.version), previous=str(current))

    async def call(self, endpoint: Endpoint, request: wire.WireModel,
                   deadline: Deadline) -> wire.WireModel:
        """Run the handler on a worker thread against the state current at arrival, or the
        one before it when the request is pinned to that version (see `pinned_state`)."""
        previous = self._previous[0] if self._previous is not None else None
        state = pinned_state(self._state, previous, getattr(request, "model_version", ""))
        if state is None:
            raise HttpError(503, f"{self.name}: no bundle loaded")
        submitted = time.perf_counter()
        timing: dict[str, float] = {}

        def work() -> wire.WireModel:
            lower_this_thread_once(self.thread_nice)
            started = time.perf_counter()
            timing["queue"] = started - submitted
            if deadline.expired:  # waited too long for a thread: nobody wants the answer
                raise DeadlineExceeded("deadline exceeded while queued")
            result = endpoint.handler(state, request, deadline)
            timing["compute"] = time.perf_counter() - started
            return result

        response = await anyio.to_thread.run_sync(work, limiter=self.limiter)
        info = getattr(response, "info", None)
        if isinstance(info, wire.StageInfo):
            info.model_version = info.model_version or str(state.version)
            info.queue_ms = timing["queue"] * 1000
            info.compute_ms = timing["compute"] * 1000
        self.metrics.observe_request(
            endpoint.path, total_s=time.perf_counter() - submitted,
            queue_s=timing["queue"], compute_s=timing["compute"],
            candidates_in=endpoint.count_in(request) if endpoint.count_in else None,
            candidates_out=endpoint.count_out(response) if endpoint.count_out else None)
        return response


def _route(runtime: StageRuntime, endpoint: Endpoint,
           internal_key: str | None) -> Callable[[Request], Any]:
    async def handle(request: Request) -> Response:
        status = 200
        try:
            _check_key(request, internal_key)  # every stage call: only the gateway may call
            deadline = Deadline.from_header(request.headers)
            if deadline.expired:
                raise DeadlineExceeded("deadline exceeded on arrival")
            body = await read_body(request, runtime.limits.max_body_bytes,
                                   runtime.limits.body_timeout_s)
            content_type = request.headers.get("content-type")
            try:
                parsed = wire.decode(endpoint.request, body, content_type)
            except ValidationError as exc:
                raise _validation_error(exc) from None
            except wire.WireError as exc:
                raise HttpError(422, str(exc), "body") from None
            check_limits(parsed, runtime.limits)
            result = await runtime.call(endpoint, parsed, deadline)
            accept = request.headers.get("accept") or ""
            media = wire.media_type(accept if "protobuf" in accept else content_type)
            return Response(wire.encode(result, media), media_type=media)
        except DeadlineExceeded as exc:
            status = 504
            runtime.metrics.count_deadline(endpoint.path)
            return json_response(504, {"detail": "deadline exceeded", "reason": str(exc)})
        except HttpError as exc:
            status = exc.status
            return error_response(exc)
        except ValueError as exc:  # a handler refusing its input (e.g. wrong vector size)
            status = 422
            return json_response(422, {"detail": str(exc)})
        finally:
            runtime.metrics.count_response(endpoint.path, status)

    return handle


UpdateFor = Callable[[Any, Ad], wire.CatalogUpdate]


def plain_update(state: Any, ad: Ad) -> wire.CatalogUpdate:
    """The catch-up update for stages that compute what they need from the raw features
    (pre-rank, rank): the same message `admin.push_ad` sends them."""
    return wire.CatalogUpdate(ad_id=ad.ad_id, scenes=list(ad.scenes), status=ad.status,
                              features=ad_features(ad))


@dataclass(frozen=True)
class CatalogFollow:
    """Where and how a stage follows the catalog (see `CatalogFollower`)."""

    redis_url: str
    prefix: str = "cascade:"
    poll_s: float = 1.0
    update_for: UpdateFor = plain_update


def catalog_follow(settings: Any, update_for: UpdateFor = plain_update) -> CatalogFollow | None:
    """The follow settings of a stage: None without REDIS_URL or with CASCADE_CATALOG_POLL_S=0."""
    if not settings.redis_url or settings.catalog_poll_s <= 0:
        return None
    return CatalogFollow(settings.redis_url, settings.redis_prefix, settings.catalog_poll_s,
                         update_for)


class CatalogFollower:
    """Keeps the served state up to date with the catalog in Redis (module docstring)."""

    STATE_CHECK_S = 0.1  # how soon a freshly loaded state is caught up (no Redis call)

    def __init__(self, runtime: StageRuntime, follow: CatalogFollow) -> None:
        from services.common.store_redis import RedisStore

        self.runtime, self.follow = runtime, follow
        self.store = RedisStore.from_url(follow.redis_url, prefix=follow.prefix,
                                         max_connections=4)
        self.version = 0  # the catalog version the followed state has caught up to
        self.followed: StageState | None = None  # the state that version belongs to
        self.applied = 0
        self.refused = 0
        self.error: str | None = None

    @property
    def caught_up(self) -> bool:
        return self.followed is not None and self.followed is self.runtime.state

    async def sync(self) -> int:
        """Apply what the served state lacks; the number of ads applied."""
        state = self.runtime.state
        if state is None:
            return 0
        if state is self.followed:
            if await self.store.catalog_version() <= self.version:
                return 0
            changes = await self.store.catalog_changes(self.version)
        else:
            changes = None
        if changes is None or changes.full_reload:  # new state, or a bulk load since
            changes = await self.store.catalog_changes(await self.store.catalog_baseline())
        found = await self.store.get_ads(changes.ad_ids)
        ads = [found[a] for a in dict.fromkeys(changes.ad_ids) if a in found]
        # Updates run torch / faiss: on the stage's worker threads, never on the event loop.
        applied = await anyio.to_thread.run_sync(self._apply, state, ads,
                                                 limiter=self.runtime.limiter)
        self.followed, self.version = state, changes.version
        self.error = None
        return applied

    def _apply(self, state: Any, ads: list[Ad]) -> int:
        applied = 0
        for ad in ads:
            try:
                state.update(self.follow.update_for(state, ad))
                applied += 1
            except (ValueError, KeyError) as exc:  # the push path answers these with a 502
                self.refused += 1
                log.warning("stage %s: catalog catch-up skipped ad %d: %s", self.runtime.name,
                            ad.ad_id, exc)
        self.applied += applied
        return applied

    async def run(self) -> None:
        """Catch up whenever a new state is installed, and poll the version every `poll_s`."""
        next_poll = 0.0
        while True:
            now = time.monotonic()
            # a new state is caught up at once; after a failure, only at the next poll
            if now >= next_poll or (not self.caught_up and self.error is None):
                next_poll = now + self.follow.poll_s
                try:
                    await self.sync()
                except Exception as exc:  # noqa: BLE001 - Redis down: keep serving, retry
                    if self.error is None:
                        log.warning("stage %s: catalog catch-up failed: %s", self.runtime.name,
                                    exc)
                    self.error = f"{type(exc).__name__}: {exc}"
            await anyio.sleep(min(self.STATE_CHECK_S, self.follow.poll_s))

    async def close(self) -> None:
        await self.store.close()


def create_stage_app(name: str, loader: Loader, *, endpoints: tuple[Endpoint, ...] = (),
                     bundle: str | None = None, limits: StageLimits | None = None,
                     admin_key: str | None = None, load_on_startup: bool = True,
                     state: StageState | None = None,
                     internal_key: str | None = None,
                     catalog: CatalogFollow | None = None) -> FastAPI:
    """Build a stage app. `bundle` loads in the background at startup (/readyz says when);
    `state` installs an already-loaded state instead (embedded use, tests).

    `internal_key` (CASCADE_INTERNAL_KEY, see `stage_key`) guards every POST endpoint and
    /admin: only the gateway, which sends it in X-API-Key, may call the stage. `admin_key` is
    the older name of the same guard. `catalog` (see `catalog_follow`) makes the stage catch
    up on catalog changes from Redis."""
    internal_key = internal_key or admin_key
    runtime = StageRuntime(name, loader, bundle=bundle, limits=limits)
    follower = CatalogFollower(runtime, catalog) if catalog is not None else None
    if state is not None:
        runtime.install(state)
        runtime.schema_sha256 = bundle_schema_sha256(bundle) if bundle else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state is None and bundle and load_on_startup:
            def initial_load() -> None:
                try:
                    runtime.load()
                except HttpError as exc:
                    runtime.load_error = str(exc.detail)
            threading.Thread(target=initial_load, name=f"{name}-load", daemon=True).start()
        if follower is None:
            yield
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(follower.run)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
        await follower.close()

    app = FastAPI(title=f"cascade {name}", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.catalog_follower = follower

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(200, {"status": "ok", "stage": name})

    @app.get("/readyz", **READYZ_ROUTE)
    async def readyz() -> Response:
        current = runtime.state
        if current is None:
            return json_response(503, {"ready": False, "stage": name, "error": runtime.load_error})
        if follower is not None and follower.followed is None:
            return json_response(503, {"ready": False, "stage": name,
                                       "error": follower.error or "catching up on the catalog"})
        body: dict[str, Any] = {"ready": True, "stage": name, "version": str(current.version)}
        if follower is not None:
            body["catalog"] = {"version": follower.version, "applied": follower.applied,
                               "refused": follower.refused, "error": follower.error}
        return json_response(200, body)

    @app.get("/metrics", **METRICS_ROUTE)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/admin/reload")
    async def reload(request: Request) -> Response:
        try:
            _check_key(request, internal_key)
            body = await read_body(request, 64 * 1024)
            try:
                asked = wire.decode(wire.ReloadRequest, body or b"{}", wire.JSON)
            except ValidationError as exc:
                raise _validation_error(exc) from None
            # Loading is slow (files, torch): off the loop, outside the request worker pool.
            result = await anyio.to_thread.run_sync(runtime.load, asked.bundle or None)
            return Response(wire.encode(result), media_type=wire.JSON)
        except HttpError as exc:
            return error_response(exc)

    async def reload_phase(request: Request) -> Response:
        """/admin/reload/{prepare,commit,abort,rollback}: the gateway's two-phase reload, so
        every stage switches to the new bundle, or none does."""
        try:
            _check_key(request, internal_key)
            phase = request.path_params["phase"]
            body = await read_body(request, 64 * 1024)
            try:  # every phase refuses a malformed body, though only prepare reads it
                asked = wire.decode(wire.ReloadRequest, body or b"{}", wire.JSON)
            except ValidationError as exc:
                raise _validation_error(exc) from None
            if phase == "prepare":
                result = await anyio.to_thread.run_sync(runtime.prepare, asked.bundle or None)
            elif phase == "commit":
                result = runtime.commit()
            elif phase == "rollback":
                result = runtime.rollback()
            elif phase == "abort":
                runtime.abort()
                return json_response(200, {"aborted": True})
            else:
                raise HttpError(404, f"unknown reload phase '{phase}'")
            return Response(wire.encode(result), media_type=wire.JSON)
        except HttpError as exc:
            return error_response(exc)

    app.add_api_route("/admin/reload/{phase}", reload_phase, methods=["POST"])

    for endpoint in endpoints:
        app.add_api_route(endpoint.path, _route(runtime, endpoint, internal_key), methods=["POST"],
                          name=endpoint.path.strip("/").replace("/", "_"))
    install_openapi(app, lambda: stage_operations(name, endpoints),
                    f"Cascade {name} stage. Every POST needs X-API-Key: the internal key "
                    "(CASCADE_INTERNAL_KEY) the gateway sends.",
                    "the internal key (CASCADE_INTERNAL_KEY)")
    return app


RELOAD_ANSWERS = {"404": "bundle not found, or an unknown reload phase",
                  "409": "another reload is in progress, or nothing prepared to commit or "
                         "to roll back to"}


def stage_operations(name: str, endpoints: tuple[Endpoint, ...]) -> dict[tuple[str, str],
                                                                        Operation]:
    """What a stage's OpenAPI documents: its endpoints and the reload phases."""
    operations = {(e.path, "post"): Operation(
        e.request, None, f"{name}: {e.path}",
        {"503": "no bundle loaded, or overloaded: retry later",
         "504": "the request's budget (X-Cascade-Budget-Ms) ran out before it could be answered"})
        for e in endpoints}
    operations[("/admin/reload", "post")] = Operation(
        wire.ReloadRequest, wire.ReloadResponse, "Load a bundle and serve it", RELOAD_ANSWERS,
        body_required=False)
    operations[("/admin/reload/{phase}", "post")] = Operation(
        wire.ReloadRequest, None, "One phase of the gateway's two-phase reload",
        RELOAD_ANSWERS, {"phase": {"type": "string",
                                   "enum": ["prepare", "commit", "abort", "rollback"]}},
        body_required=False)
    return operations


MIN_KEY_CHARS = 16


def stage_key(settings: Any) -> str | None:
    """The key a stage service requires (CASCADE_INTERNAL_KEY); None with CASCADE_AUTH=off.

    A stage refuses to start with auth on and no key, or one shorter than 16 characters."""
    if not settings.auth:
        return None
    key = settings.internal_key
    if not key or len(key) < MIN_KEY_CHARS:
        raise ValueError(f"CASCADE_INTERNAL_KEY {'is too short' if key else 'not set'}: a stage "
                         f"service needs a key of at least {MIN_KEY_CHARS} characters, which "
                         f"the gateway sends (or CASCADE_AUTH=off for a local demo)")
    return key


def _check_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise HttpError(401, "missing or wrong X-API-Key (the internal key)")


def runtime_of(app: FastAPI) -> StageRuntime:
    return app.state.runtime
