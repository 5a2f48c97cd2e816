"""Stage clients: one interface per stage, in-process or over HTTP; the cascade sees only this.

`StageClient.call(request, deadline)` returns the stage's response or raises; the cascade
decides what a failure means (skip the stage, keep the previous order). Two implementations:

- `LocalStage`: the stage's state object in this process (`state.handle(request, deadline)`),
  run on a small thread pool so faiss/torch never block the event loop. The state is held by
  reference and swapped whole on reload, so in-flight calls finish on the old bundle.
- `HttpStage`: one `httpx.AsyncClient` per stage with pooled keep-alive connections, protobuf
  bodies (candidate lists are packed bytes), the remaining budget in `X-Cascade-Budget-Ms`, and
  a timeout equal to that remaining budget. A circuit breaker (services/gateway/breaker.py)
  stops calling a stage after a few consecutive failures or timeouts and probes it again, so a
  hung stage costs each request nothing instead of its whole budget.

A thread cannot be cancelled, so a hung in-process stage keeps its worker thread until its own
deadline check lets it go; the cascade stops waiting at the deadline either way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.to_thread
import httpx

from services.common import wire
from services.common.bundle_guard import bundle_schema_sha256, check_same_schema
from services.common.deadline import Deadline, DeadlineExceeded
from services.gateway.breaker import BreakerConfig, BreakerOpen, CircuitBreaker

Req = TypeVar("Req", bound=wire.WireModel)
Resp = TypeVar("Resp", bound=wire.WireModel)


class StageError(RuntimeError):
    """A stage answered with an error, or could not be reached; the message says which."""


class StageSkipped(StageError):
    """Not called: the stage's circuit breaker is open."""


class StageClient(Protocol[Req, Resp]):
    """What the cascade needs from a stage, wherever it runs."""

    name: str

    async def call(self, request: Req, deadline: Deadline) -> Resp: ...
    async def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse | None: ...
    async def reload(self, bundle: str | None) -> wire.ReloadResponse: ...
    # The two-phase reload the gateway drives (admin.py): every stage or none switches.
    async def prepare(self, bundle: str | None) -> wire.ReloadResponse: ...
    async def commit(self) -> wire.ReloadResponse: ...
    async def abort(self) -> None: ...
    async def rollback(self) -> wire.ReloadResponse: ...
    async def ready(self) -> bool: ...
    async def close(self) -> None: ...


class LocalStage(Generic[Req, Resp]):
    """A stage state in this process. `loader(bundle_path) -> state` for reloads."""

    def __init__(self, name: str, state: Any, loader: Callable[[str], Any] | None = None,
                 bundle: str | None = None, threads: int = 4) -> None:
        self.name = name
        self.state = state
        self.loader = loader
        self.bundle = bundle
        # its own small pool (threads start lazily, after a pre-fork): an executor hop costs
        # half of anyio's to_thread, and it is paid three times per request
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix=f"cascade-{name}")
        self._reload_lock = threading.Lock()
        # the schema of the bundle being served, recorded now: `current` may move later
        self.schema_sha256 = bundle_schema_sha256(bundle) if bundle else None
        self._staged: tuple[Any, str, str | None] | None = None  # prepared, not yet served
        self._previous: tuple[Any, str | None, str | None] | None = None  # before the commit

    @property
    def version(self) -> str:
        return str(getattr(self.state, "version", ""))

    async def call(self, request: Req, deadline: Deadline) -> Resp:
        state = self.state  # one reference for the whole call (atomic swap on reload)

        def work() -> Resp:
            if deadline.expired:
                raise DeadlineExceeded(f"{self.name}: deadline passed while queued")
            return state.handle(request, deadline)

        # a cancelled wait (deadline) abandons the thread's work; it stops at its own checks
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse | None:
        method = getattr(self.state, "update", None)
        if method is None:
            return None
        return await anyio.to_thread.run_sync(method, update)

    async def reload(self, bundle: str | None) -> wire.ReloadResponse:
        await self.prepare(bundle)
        return await self.commit()

    async def prepare(self, bundle: str | None) -> wire.ReloadResponse:
        """Load and verify `bundle` beside the served state; serve it only on `commit`."""
        if self.loader is None:
            raise StageError(f"{self.name}: no loader configured, cannot reload")
        path = bundle or self.bundle
        if not path:
            raise StageError(f"{self.name}: no bundle given and none configured")
        if not self._reload_lock.acquire(blocking=False):
            raise StageError(f"{self.name}: another reload is in progress")
        try:
            # SchemaMismatch (a ValueError) before anything is loaded
            schema = check_same_schema(self.schema_sha256, path)
            state = await anyio.to_thread.run_sync(self.loader, path)
            self._staged = (state, path, schema)
            return wire.ReloadResponse(version=str(state.version), previous=self.version)
        finally:
            self._reload_lock.release()

    async def commit(self) -> wire.ReloadResponse:
        staged, self._staged = self._staged, None
        if staged is None:
            raise StageError(f"{self.name}: nothing prepared to commit")
        previous = self.version
        self._previous = (self.state, self.bundle, self.schema_sha256)
        self.state, self.bundle, self.schema_sha256 = staged
        return wire.ReloadResponse(version=self.version, previous=previous)

    async def abort(self) -> None:
        self._staged = None

    async def rollback(self) -> wire.ReloadResponse:
        if self._previous is None:
            raise StageError(f"{self.name}: no previous state to roll back to")
        current = self.version
        (self.state, self.bundle, self.schema_sha256), self._previous = self._previous, None
        return wire.ReloadResponse(version=self.version, previous=current)

    async def ready(self) -> bool:
        return self.state is not None

    async def close(self) -> None:
        return None


class HttpStage(Generic[Req, Resp]):
    """A stage behind HTTP: POST `path` with a protobuf body, pooled keep-alive connections."""

    def __init__(self, name: str, base_url: str, path: str, response: type[Resp], *,
                 admin_key: str | None = None, encoding: str = wire.PROTOBUF,
                 max_connections: int = 64, transport: httpx.AsyncBaseTransport | None = None,
                 breaker: BreakerConfig | None = None) -> None:
        self.name = name
        self.path = path
        self.response = response
        self.encoding = encoding
        self.admin_key = admin_key
        self.breaker = CircuitBreaker(name, breaker)
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections, keepalive_expiry=30.0)
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), limits=limits,
                                         transport=transport, timeout=10.0)

    def _admin_headers(self) -> dict[str, str]:
        """The internal key (CASCADE_INTERNAL_KEY): stage services refuse calls without it."""
        return {"X-API-Key": self.admin_key} if self.admin_key else {}

    async def call(self, request: Req, deadline: Deadline) -> Resp:
        remaining = deadline.remaining_s()
        if remaining <= 0:
            raise DeadlineExceeded(f"{self.name}: no budget left to call")
        try:
            self.breaker.before_call()
        except BreakerOpen as exc:
            raise StageSkipped(str(exc)) from None
        try:
            response = await self._call(request, deadline, remaining)
        except Exception:  # refused, unreachable, timed out, or an undecodable answer
            self.breaker.failure()
            raise
        except asyncio.CancelledError:  # the cascade stopped waiting: at its deadline, a failure
            if deadline.expired:
                self.breaker.failure()
            else:
                self.breaker.release()
            raise
        self.breaker.success()
        return response

    async def _call(self, request: Req, deadline: Deadline, remaining: float) -> Resp:
        headers = {"Content-Type": self.encoding, "Accept": self.encoding, **deadline.header(),
                   **self._admin_headers()}
        try:
            reply = await self._client.post(self.path, content=wire.encode(request, self.encoding),
                                            headers=headers,
                                            timeout=None if remaining == float("inf")
                                            else remaining)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"{self.name}: no answer within the budget") from exc
        except httpx.HTTPError as exc:
            raise StageError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        if reply.status_code != 200:
            raise StageError(f"{self.name}: HTTP {reply.status_code}: {reply.text[:200]}")
        return wire.decode(self.response, reply.content, reply.headers.get("content-type"))

    async def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse | None:
        reply = await self._client.post("/admin/ads", content=wire.encode(update),
                                         headers={"Content-Type": wire.JSON,
                                                  **self._admin_headers()})
        if reply.status_code == 404:  # a stage without catalog updates
            return None
        if reply.status_code != 200:
            raise StageError(f"{self.name}: /admin/ads HTTP {reply.status_code}: "
                             f"{reply.text[:200]}")
        return wire.decode(wire.CatalogUpdateResponse, reply.content, wire.JSON)

    async def reload(self, bundle: str | None) -> wire.ReloadResponse:
        return await self._admin("/admin/reload", bundle)

    async def prepare(self, bundle: str | None) -> wire.ReloadResponse:
        return await self._admin("/admin/reload/prepare", bundle)

    async def commit(self) -> wire.ReloadResponse:
        return await self._admin("/admin/reload/commit", None)

    async def abort(self) -> None:
        reply = await self._client.post("/admin/reload/abort", headers=self._admin_headers())
        if reply.status_code != 200:
            raise StageError(f"{self.name}: abort HTTP {reply.status_code}: {reply.text[:200]}")

    async def rollback(self) -> wire.ReloadResponse:
        return await self._admin("/admin/reload/rollback", None)

    async def _admin(self, path: str, bundle: str | None) -> wire.ReloadResponse:
        body = wire.encode(wire.ReloadRequest(bundle=bundle or ""))
        reply = await self._client.post(path, content=body, timeout=300.0,
                                        headers={"Content-Type": wire.JSON,
                                                 **self._admin_headers()})
        if reply.status_code != 200:
            raise StageError(f"{self.name}: {path} HTTP {reply.status_code}: "
                             f"{reply.text[:200]}")
        return wire.decode(wire.ReloadResponse, reply.content, wire.JSON)

    async def ready(self) -> bool:
        try:
            reply = await self._client.get("/readyz", timeout=2.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()
